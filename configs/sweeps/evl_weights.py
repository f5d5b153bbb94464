"""Sweep: EVL's λ grid (λ_m = λ_r = λ_ot) x seeds, one run per point.

  python -m evl_ecg_jax.sweep --config=configs/default.py:mode=distill,loss=evl \
      --sweep=configs/sweeps/evl_weights.py:3 --workdir=workdir/sweep_evl \
      -- --config.teacher.init=workdir/teacher

`arg`: number of seeds (default 1).
"""

import itertools

WEIGHTS = (0.01, 0.03, 0.1)


def get_sweep(arg=None):
  seeds = range(int(arg or 1))
  return [{"loss.terms.mhca.weight": w, "loss.terms.relation.weight": w,
           "loss.terms.ot.weight": w, "seed": seed}
          for w, seed in itertools.product(WEIGHTS, seeds)]
