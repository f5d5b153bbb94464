"""Relation losses: EVL-ECG's token geometry within a sequence (relation_loss,
the paper's L_rel) and RKD's across the global batch's records (rkd_loss:
the `rkd` baseline, and what `loss=evl`'s L_rel computes on the records'
embeddings; the Relation part in losses/terms.py chooses)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from evl_ecg_jax.losses import _ops


def _pair_mean(x, pairs):
  """Per-sequence mean of x [B, N, N] over the pairs in `pairs` [B, N, N]."""
  return jnp.sum(x * pairs, axis=(-2, -1)) / jnp.maximum(
      jnp.sum(pairs, axis=(-2, -1)), 1.0)


def _normalized(dist, pairs):
  """Distances divided by their mean over the valid pairs of the sequence."""
  scale = _pair_mean(dist, pairs)[:, None, None]
  return dist / jnp.maximum(scale, 1e-12)


def normalized_distances(tokens, pairs):
  """D_ij = ‖x_i − x_j‖ / mean_{valid i≠j} ‖x_i − x_j‖ (EVL-ECG, L_D)."""
  return _normalized(_ops.pairwise_distances(tokens), pairs)


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
  (dist_t, cos_t), (dist_s, cos_s) = (_ops.distances_and_cosines(x)
                                      for x in (t, s))
  loss_d = _pair_mean((_normalized(dist_t, pairs)
                       - _normalized(dist_s, pairs)) ** 2, pairs)
  loss_a = _pair_mean((cos_t - cos_s) ** 2, pairs)
  return jnp.mean(0.5 * (loss_d + loss_a))


def rkd_loss(teacher_emb, student_emb, *, distance_weight=1.0,
             angle_weight=2.0, axis_name=None):
  """Relational KD (Park et al., CVPR 2019): λ_D L_RKD-D + λ_A L_RKD-A.

  Relations are taken across the global batch. With l_δ the Huber
  (smooth-L1) loss, δ = 1:
    L_RKD-D = mean_{i≠j} l_δ(ψ_D(t_i, t_j), ψ_D(s_i, s_j)),
      ψ_D(x_i, x_j) = ‖x_i − x_j‖ / μ, μ the mean distance over pairs i≠j;
    L_RKD-A = mean_{i,j,k distinct} l_δ(ψ_A(t_i, t_j, t_k), ψ_A(s_i, s_j, s_k)),
      ψ_A = cos∠x_i x_j x_k = ⟨(x_i − x_j) / ‖·‖, (x_k − x_j) / ‖·‖⟩.
  The paper sums over the tuple sets χ², χ³; we average (the authors' code
  averages over all B² / B³ entries, degenerate ones included). λ_D = 1,
  λ_A = 2 are the paper's weights. Invariant to rotation, translation and
  uniform scaling of either embedding; widths may differ.

  Under a per-device step (`axis_name`), the rows of every device are
  gathered (B × (Dt + Ds) values); each device computes the B × B
  distances and the angles at its own apexes j ([b, B, B], not [B, B, B]),
  and the apex means are summed over the axis (`_ops` has the gradient
  convention).

  Args:
    teacher_emb: [b, Dt] teacher embeddings (B ≥ 3 for the angle term).
    student_emb: [b, Ds] student embeddings.
    distance_weight: λ_D.
    angle_weight: λ_A.
    axis_name: the data axis of a per-device step, or None (all rows here).

  Returns:
    Scalar float32, the global batch's value on every device.
  """
  t, s = _ops.f32(teacher_emb, student_emb)
  if t.ndim != 2 or s.ndim != 2 or t.shape[0] != s.shape[0]:
    raise ValueError(f"rkd_loss: teacher {t.shape} and student {s.shape} must "
                     "be [B, D] with the same batch.")
  own = _ops.own_rows(axis_name, t.shape[0])
  t, s = (_ops.global_rows(x, axis_name) for x in (t, s))
  pairs = _ops.pair_mask(None, t.shape[0])
  loss_d = _pair_mean(optax.huber_loss(normalized_distances(s[None], pairs),
                                       normalized_distances(t[None], pairs)),
                      pairs)[0]
  # angle[j, i, k] = cos of the angle at x_j between x_i − x_j and x_k − x_j,
  # for this device's apexes j.
  angle_t, angle_s = (_ops.cosine_matrix(x[None, :, :] - x[own, None, :])
                      for x in (t, s))
  off = pairs[0]
  distinct = off[own, :, None] * off[own, None, :] * off[None]
  # Every apex j has (B−1)(B−2) triplets: the mean of the per-apex means is
  # the mean over all triplets.
  apex_sum = jnp.sum(_pair_mean(optax.huber_loss(angle_s, angle_t), distinct))
  loss_a = _ops.global_sum(apex_sum, axis_name) / t.shape[0]
  return distance_weight * loss_d + angle_weight * loss_a
