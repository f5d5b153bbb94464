"""MHCA alignment of EVL-ECG (L_mhca), with a guard against collapse.

Ĥ_t = MHCA(Q = H_s, K = V = H_t) resamples the teacher's hidden states to the
student's length and width; L_mhca = mean ‖H_s − Ĥ_t‖².

Why a guard: W^Q, W^K, W^V, W^O are learned. Trained on L_mhca they need no
teacher information to drive it to 0: the queries carry H_s, so attention can
learn to rebuild H_s from teacher values (a "query leak"), or both sides can
agree on a constant. Measured (README): with normalised features and
stop-gradient queries, an aligner trained on L_mhca reached L_mhca = 0.001
(from 1.83) for a student that sees none of the teacher's input.

The design here, measured to hold (an unrelated student stays at 99 % of its
initial loss, a student that sees the teacher's input goes lower):
1. Normalised targets: both sides are standardised per token
   (`_ops.standardize`), so L_mhca ∈ [0, 4] (2 = uncorrelated) and nobody
   lowers it by shrinking.
2. The student learns from L_mhca against stop_gradient(Ĥ_t) and its
   queries enter the aligner with stop_gradient, so it cannot steer which
   teacher tokens it is compared with.
3. The aligner never learns from L_mhca. It learns from a reconstruction
   term: a decoder with learned per-position queries must rebuild the
   (standardised) teacher states from Ĥ_t alone, so Ĥ_t keeps the teacher's
   information at the student's positions (`mhca_reconstruction_loss`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def _attention_mask(key_mask):
  """[B, K] bool key mask -> [B, 1, 1, K], broadcast over heads and queries."""
  return None if key_mask is None else jnp.asarray(key_mask, bool)[:, None,
                                                                    None, :]


class MHCAAligner(nn.Module):
  """Multi-head cross-attention from student queries to teacher keys/values.

  Returns (aligned [B, M, Ds], reconstruction [B, N, Dt] or None). The
  reconstruction decodes the teacher's standardised states back from the
  aligned ones (the anti-collapse term, see the module docstring).

  The projections have no biases: the inputs are standardised, and a key
  bias has an exactly-zero gradient (softmax is shift-invariant), which Adam
  would turn into noise-driven updates.

  Attributes:
    num_heads: attention heads.
    qkv_features: width of W^Q, W^K, W^V (default: the student width Ds).
    reconstruct: build the decoder and return the reconstruction.
    stop_query_gradient: queries are stop_gradient(H_s).
    dtype: computation dtype (parameters stay float32).
  """
  num_heads: int = 4
  qkv_features: Optional[int] = None
  reconstruct: bool = True
  stop_query_gradient: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, student_hidden, teacher_hidden, *, teacher_mask=None,
               student_mask=None):
    width_s, width_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    features = self.qkv_features or width_s
    queries = student_hidden
    if self.stop_query_gradient:
      queries = jax.lax.stop_gradient(queries)
    queries = _ops.standardize(queries).astype(self.dtype)
    keys = _ops.standardize(teacher_hidden).astype(self.dtype)
    aligned = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=features, out_features=width_s,
        use_bias=False, dtype=self.dtype, name="align")(
            queries, keys, mask=_attention_mask(teacher_mask))
    if not self.reconstruct:
      return aligned, None
    positions = self.param("decoder_queries", nn.initializers.normal(1.0),
                           (teacher_hidden.shape[1], features))
    positions = jnp.broadcast_to(positions.astype(self.dtype),
                                 (aligned.shape[0],) + positions.shape)
    reconstruction = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=features, out_features=width_t,
        use_bias=False, dtype=self.dtype, name="decode")(
            positions, aligned, mask=_attention_mask(student_mask))
    return aligned, reconstruction


def _token_mse(target, prediction, mask):
  """Per-token mean over channels of the squared error, sequence-averaged."""
  err = jnp.mean((target - prediction) ** 2, axis=-1)
  return _ops.sequence_mean(err, mask)


def mhca_loss(student_hidden, aligned_teacher, *, mask=None, normalize=True):
  """MHCA alignment loss, EVL-ECG: L_mhca = mean_i ‖H_s,i − Ĥ_t,i‖².

  The mean runs over valid student positions and channels (‖·‖²/Ds) of each
  sequence, then over the batch. With `normalize` (default) both sides are
  standardised per token first, so the value lies in [0, 4], 2 meaning
  uncorrelated. Pass stop_gradient(Ĥ_t) as `aligned_teacher` when training a
  student (see the module docstring); the function itself stops nothing.

  Args:
    student_hidden: [B, M, Ds] student hidden states H_s.
    aligned_teacher: [B, M, Ds] MHCA output Ĥ_t.
    mask: optional [B, M] bool, True = valid student position.
    normalize: standardise both sides per token.

  Returns:
    Scalar float32, mean over the batch.
  """
  s, t = _ops.f32(student_hidden, aligned_teacher)
  if s.shape != t.shape:
    raise ValueError(f"mhca_loss: student {s.shape} and aligned teacher "
                     f"{t.shape} must have the same shape [B, M, Ds].")
  if normalize:
    s, t = _ops.standardize(s), _ops.standardize(t)
  return _token_mse(s, t, mask)


def mhca_reconstruction_loss(teacher_hidden, reconstruction, *, mask=None):
  """Anti-collapse term of the aligner: mean_j ‖std(H_t,j) − R_j‖² / Dt.

  R = decoder(Ĥ_t) must rebuild the standardised teacher states, so the
  aligned states cannot discard the teacher's information.

  Args:
    teacher_hidden: [B, N, Dt] teacher hidden states H_t.
    reconstruction: [B, N, Dt] the aligner's reconstruction.
    mask: optional [B, N] bool, True = valid teacher token.

  Returns:
    Scalar float32, mean over the batch.
  """
  t, r = _ops.f32(teacher_hidden, reconstruction)
  return _token_mse(_ops.standardize(t), r, mask)
