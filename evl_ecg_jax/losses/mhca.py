"""MHCA alignment of EVL-ECG (L_mhca), with a guard against collapse.

Ĥ_t = MHCA(Q = H_s, K = V = H_t) resamples the teacher's hidden states to the
student's length and width; L_mhca = mean ‖H_s − Ĥ_t‖².

Why a guard: W^Q, W^K, W^V, W^O are learned. Trained on L_mhca they need no
teacher information to drive it to 0: the queries carry H_s, so attention can
learn to rebuild H_s from teacher values (a "query leak"), or both sides can
agree on a constant. Measured (docs/losses.md): with normalised features and
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

Departure from the paper (`time_sigma` > 0; docs/evl.md): attention logits
get a temporal prior −(τ_q − τ_k)² / (2σ²), τ the token's relative position
in its sequence. Teacher and student tokens cover the same 10 s in the same
order, but attention on content alone gave Ĥ_t one vector repeated at every
position (mean token cosine 0.95): each student position was compared with
the teacher's average, not with what the teacher saw at that time. The
decoder gets the same prior, so the reconstruction must come from Ĥ_t's
nearby positions.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def _attention_mask(key_mask):
  """[B, K] bool key mask -> [B, 1, 1, K], broadcast over heads and queries."""
  return None if key_mask is None else jnp.asarray(key_mask, bool)[:, None,
                                                                    None, :]


def relative_positions(mask, batch, n):
  """[B, n] position τ ∈ (0, 1) of each token among the valid ones of its
  sequence, (k + ½)/n_valid (0 on padding)."""
  valid = (jnp.ones((batch, n), jnp.float32) if mask is None
           else jnp.asarray(mask, jnp.float32))
  count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1.0)
  return (jnp.cumsum(valid, axis=-1) - 0.5 * valid) / count * valid


def temporal_prior(query_mask, key_mask, shape, sigma):
  """[B, 1, Q, K] log-prior −(τ_q − τ_k)² / (2σ²) on attention logits."""
  batch, q, k = shape
  tau_q = relative_positions(query_mask, batch, q)
  tau_k = relative_positions(key_mask, batch, k)
  return (-(tau_q[:, :, None] - tau_k[:, None, :]) ** 2
          / (2.0 * sigma**2))[:, None]


def _tempered_attention(query, key, value, mask=None, dropout_rng=None,
                        dropout_rate=0.0, broadcast_dropout=True,
                        deterministic=False, dtype=None, precision=None,
                        module=None, *, prior=None, temperature=1.0):
  """nn.dot_product_attention with a logit bias (`prior`) and a temperature.

  The parameters are spelled out: flax passes an `attention_fn` only the
  keyword arguments its signature names (the mask among them).
  """
  return nn.dot_product_attention(
      query / temperature, key, value, bias=prior, mask=mask,
      dropout_rng=dropout_rng, dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout, deterministic=deterministic,
      dtype=dtype, precision=precision, module=module)


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
    time_sigma: σ of the temporal prior on both attentions, in units of the
      sequence length (0: none, the paper's content-only attention).
    temperature: attention logits are divided by it.
    dtype: computation dtype (parameters stay float32).

  The attention weights are sown as intermediates "align"/"decode"
  ("attention_weights", [B, H, Q, K]) for diagnostics.
  """
  num_heads: int
  qkv_features: Optional[int] = None
  reconstruct: bool = True
  stop_query_gradient: bool = True
  time_sigma: float = 0.0
  temperature: float = 1.0
  dtype: jnp.dtype = jnp.float32

  def _attention(self, features, out_features, name, queries, keys,
                 query_mask, key_mask):
    bias = None
    if self.time_sigma > 0:
      bias = temporal_prior(query_mask, key_mask,
                            (queries.shape[0], queries.shape[1],
                             keys.shape[1]), self.time_sigma)
    return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=features,
        out_features=out_features, use_bias=False, dtype=self.dtype,
        attention_fn=functools.partial(
            _tempered_attention, prior=bias, temperature=self.temperature),
        name=name)(
            queries, keys, mask=_attention_mask(key_mask),
            sow_weights=self.is_mutable_collection("intermediates"))

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
    aligned = self._attention(features, width_s, "align", queries, keys,
                              student_mask, teacher_mask)
    if not self.reconstruct:
      return aligned, None
    positions = self.param("decoder_queries", nn.initializers.normal(1.0),
                           (teacher_hidden.shape[1], features))
    positions = jnp.broadcast_to(positions.astype(self.dtype),
                                 (aligned.shape[0],) + positions.shape)
    reconstruction = self._attention(features, width_t, "decode", positions,
                                     aligned, teacher_mask, student_mask)
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
