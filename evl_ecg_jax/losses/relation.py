"""Geometric relation loss of EVL-ECG (within-sequence token geometry)."""

from __future__ import annotations

import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def _pair_mean(x, pairs):
  """Per-sequence mean of x [B, N, N] over the pairs in `pairs` [B, N, N]."""
  return jnp.sum(x * pairs, axis=(-2, -1)) / jnp.maximum(
      jnp.sum(pairs, axis=(-2, -1)), 1.0)


def normalized_distances(tokens, pairs):
  """D_ij = ‖x_i − x_j‖ / mean_{valid i≠j} ‖x_i − x_j‖ (EVL-ECG, L_D)."""
  dist = _ops.pairwise_distances(tokens)
  scale = _pair_mean(dist, pairs)[:, None, None]
  return dist / jnp.maximum(scale, 1e-12)


def relation_loss(teacher_tokens, student_tokens, *, mask=None):
  """Geometric relation loss, EVL-ECG: L_rel = ½ (L_D + L_A).

  L_D: mean over valid pairs i≠j of (D^t_ij − D^s_ij)², with D the pairwise
  Euclidean distances of a sequence divided by their mean over valid pairs.
  L_A: the same for A_ij = cos(x_i, x_j). Invariant to rotations,
  translations (L_D) and scale of either sequence; widths may differ.

  Args:
    teacher_tokens: [B, N, Dt] aligned teacher states (e.g. MHCA output).
    student_tokens: [B, N, Ds] student states.
    mask: optional [B, N] bool, True = valid token.

  Returns:
    Scalar float32, mean over the sequences of the batch.
  """
  t, s = _ops.f32(teacher_tokens, student_tokens)
  if t.shape[:2] != s.shape[:2]:
    raise ValueError(f"relation_loss: teacher {t.shape} and student {s.shape} "
                     "must share batch and length (align the teacher first).")
  pairs = _ops.pair_mask(mask, t.shape[1])
  loss_d = _pair_mean((normalized_distances(t, pairs)
                       - normalized_distances(s, pairs)) ** 2, pairs)
  loss_a = _pair_mean((_ops.cosine_matrix(t) - _ops.cosine_matrix(s)) ** 2,
                      pairs)
  return jnp.mean(0.5 * (loss_d + loss_a))
