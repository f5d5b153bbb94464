"""Sweep: every KD method and EVL ablation (rows of the KD table).

  python -m evl_ecg_jax.sweep --config=configs/default.py:mode=distill \
      --sweep=configs/sweeps/loss_methods.py --workdir=workdir/sweep \
      -- --config.teacher.init=workdir/teacher

`arg`: extra variants for every point, e.g. "student_leads=I".
"""

METHODS = ("ce", "kd", "fitnet", "rkd", "dkd", "tinybert", "uld", "crd",
           "dist", "evl", "evl_no_mhca", "evl_no_ot", "evl_no_rel")


def get_sweep(arg=None):
  extra = f",{arg}" if arg else ""
  return [{"variants": f"loss={m}{extra}"} for m in METHODS]
