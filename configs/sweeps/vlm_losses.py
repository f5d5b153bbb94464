"""Sweep: the VLM student's distillation variants, EVL's λ scale on validation.

  python -m evl_ecg_jax.main --config=configs/vlm.py:mode=train_teacher \
      --workdir=workdir/vlm/teacher
  python -m evl_ecg_jax.sweep --config=configs/vlm.py:mode=distill \
      --sweep=configs/sweeps/vlm_losses.py --workdir=workdir/vlm/students \
      --columns=validation/soft/macro_auc,test/soft/macro_auc,test/hard/macro_auc,test/hard/macro_f1,test/hard/accuracy,test/qa/accuracy \
      -- --config.teacher.init=workdir/vlm/teacher

Points: task loss only, the paper's EVL (configs/vlm.py's evl_paper), and
the redesigned EVL at its configured λ (λ_m = 0.1, λ_r = λ_ot = 1) times
each of SCALES. `arg`: the scale chosen on validation (validation soft
AUC of the first run); adds the shuffled-teacher control at that scale.
"""

from configs import vlm

SCALES = (1.0, 0.1)
_EVL = {k: vlm.get_config("loss=evl").loss.terms[k].weight
        for k in ("mhca", "relation", "ot")}


def _evl(variant, scale):
  return {"variants": f"loss={variant}",
          **{f"loss.terms.{k}.weight": round(v * scale, 6)
             for k, v in _EVL.items()}}


def get_sweep(arg=None):
  points = [{"variants": "loss=ce"}, {"variants": "loss=evl_paper"}]
  points += [_evl("evl", s) for s in SCALES]
  if arg:
    points.append(_evl("evl_shuffled", float(arg)))
  return points
