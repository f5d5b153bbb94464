"""Contrastive representation distillation (CRD, Tian et al., ICLR 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def crd_loss(teacher_emb, student_emb, *, temperature, axis_name=None):
  """CRD with the global batch's records as negatives.

  With z = x / ‖x‖ of the two embeddings (already in a common width: the
  CRD part's learned heads g_T, g_S), the critic of the pair (t_j, s_i) is
  exp(⟨z_s,i, z_t,j⟩ / τ). Each record's own pair is the positive and the
  B − 1 other records of the global batch are its negatives, from both
  anchors:
    L = ½ mean_i [−log softmax_j(⟨z_s,i, z_t,j⟩ / τ)_i
                  −log softmax_j(⟨z_t,i, z_s,j⟩ / τ)_i].
  Tian et al. estimate their critic with NCE against a memory bank of 16384
  negatives; this is the softmax (InfoNCE) form they relate it to (their
  §3.4), on in-batch negatives, symmetric over the two anchors as their
  implementation's two contrast terms.

  Under a per-device step (`axis_name`) both embeddings are gathered
  (B × 2D values); each device scores its own rows against the B others
  and the row sums are summed over the axis (`_ops` has the gradient
  convention).

  Args:
    teacher_emb: [b, D] teacher embeddings (B ≥ 2: a positive and a
      negative).
    student_emb: [b, D] student embeddings, same width.
    temperature: τ > 0.
    axis_name: the data axis of a per-device step, or None (all rows here).

  Returns:
    Scalar float32, the global batch's value on every device.
  """
  t, s = _ops.f32(teacher_emb, student_emb)
  if t.ndim != 2 or t.shape != s.shape:
    raise ValueError(f"crd_loss: teacher {t.shape} and student {s.shape} must "
                     "both be [B, D] (project them to one width).")
  t, s = _ops.unit_rows(t), _ops.unit_rows(s)
  own = _ops.own_rows(axis_name, t.shape[0])
  all_t, all_s = (_ops.global_rows(x, axis_name) for x in (t, s))
  rows = jnp.arange(t.shape[0])
  nll = lambda anchor, others: -jax.nn.log_softmax(
      anchor @ others.T / temperature, axis=-1)[rows, own]
  row_sum = 0.5 * jnp.sum(nll(s, all_t) + nll(t, all_s))
  return _ops.global_sum(row_sum, axis_name) / all_t.shape[0]
