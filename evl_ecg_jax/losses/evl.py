"""EVL-ECG's combined loss (Eq. 9) and the token normalisation of its OT term.

    L = (1 − α)·L_task + α·(λ_m·L_mhca + λ_r·L_rel + λ_ot·L_ot)

`losses.objective` builds the trainable objective on these, with the KD
baselines as further weighted terms of the same sum.
"""

from __future__ import annotations

import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def evl_loss(task_loss, distill_terms, *, alpha, weights):
  """EVL-ECG Eq. 9: L = (1 − α)·L_task + α·Σ_k λ_k·L_k.

  Args:
    task_loss: scalar L_task (L_CE).
    distill_terms: {k: scalar L_k}, every key present in `weights`.
    alpha: α ∈ [0, 1].
    weights: {k: λ_k}.

  Returns:
    Scalar total loss.
  """
  total = (1.0 - alpha) * task_loss
  for name, value in distill_terms.items():
    total = total + alpha * weights[name] * value
  return total


def unit_tokens(x):
  """Standardise each token, then scale it to unit Euclidean norm.

  Both sides of L_ot go through this, so the squared-Euclidean cost lies in
  [0, 4] and ε means the same for every model width.
  """
  return _ops.standardize(x) / jnp.sqrt(float(x.shape[-1]))
