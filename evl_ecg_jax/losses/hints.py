"""Intermediate-feature distillation baselines: FitNets and TinyBERT."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


class HintRegressor(nn.Module):
  """FitNets regressor r(·; W_r): a Dense map of student widths Ds → Dt.

  The projection belongs to the distillation objective, not to the student:
  its parameters are created here and trained jointly with the student
  (Romero et al. 2015 use a convolution; on tokens it is a per-token Dense,
  the 1×1 case). It also serves as TinyBERT's W_h.
  """
  features: int  # Dt, the teacher width.

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name="proj")(x)


def _mse(teacher, student, mask, name):
  """Mean of (t − s)² over the entries where `mask` (broadcastable) is True."""
  t, s = _ops.f32(teacher, student)
  if t.shape != s.shape:
    raise ValueError(f"{name}: teacher {t.shape} and student {s.shape} must "
                     "have the same shape (project the student to Dt).")
  return _ops.masked_mean((t - s) ** 2, mask)


def fitnet_loss(teacher_hidden, projected_student, *, mask=None):
  """FitNets hint loss (Romero et al. 2015, Eq. 3).

  L_HT = ½ ‖u_h(x) − r(v_g(x))‖², here as the mean squared error over tokens
  and channels: u_h the teacher hint, v_g the student guided layer and r the
  `HintRegressor`, applied by the caller and trained with the student.

  Args:
    teacher_hidden: [B, N, Dt] teacher hint u_h.
    projected_student: [B, N, Dt] r(v_g), the regressed student features.
    mask: optional [B, N] bool, True = valid token.

  Returns:
    Scalar float32: mean over valid tokens and channels.
  """
  mask = None if mask is None else jnp.asarray(mask, bool)[..., None]
  return _mse(teacher_hidden, projected_student, mask, "fitnet_loss")


def tinybert_loss(teacher_hiddens, student_hiddens, teacher_attn=None,
                  student_attn=None, *, layer_map, projection=None, mask=None):
  """TinyBERT Transformer-layer distillation (Jiao et al. 2020, Sec. 3.1).

  L = Σ_{(m, n) ∈ layer_map} [MSE(H^s_m W_h, H^t_n) + (1/h) Σ_i MSE(A^s_mi,
  A^t_ni)]; the attention term is added when attentions are given (the paper
  matches the unnormalised, pre-softmax scores). Index 0 of the hidden lists
  may hold the embeddings, giving the embedding-layer loss (paper: a separate
  W_e; call this twice for that). The prediction-layer loss is
  `softmax_kd_loss`.

  Args:
    teacher_hiddens: sequence of [B, N, Dt].
    student_hiddens: sequence of [B, N, Ds].
    teacher_attn: None or a sequence of [B, H, N, N] attention scores.
    student_attn: None or a sequence of [B, H, N, N] (same H as the teacher).
    layer_map: sequence of (student_layer, teacher_layer) index pairs.
    projection: W_h, a callable [B, N, Ds] → [B, N, Dt] (e.g. a bound
      `HintRegressor`, trained with the student); None when Ds = Dt.
    mask: optional [B, N] bool, True = valid token (attention entries count
      when both query and key are valid).

  Returns:
    Scalar float32: the sum over mapped layers of batch means.
  """
  if (teacher_attn is None) != (student_attn is None):
    raise ValueError("tinybert_loss: give both teacher_attn and student_attn "
                     "or neither.")
  project = projection or (lambda h: h)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    query_key = mask[:, None, :, None] & mask[:, None, None, :]  # [B,1,N,N]
  total = jnp.float32(0.0)
  for m, n in layer_map:
    total += fitnet_loss(teacher_hiddens[n], project(student_hiddens[m]),
                         mask=mask)
    if teacher_attn is not None:
      total += _mse(teacher_attn[n], student_attn[m],
                    None if mask is None else query_key, "tinybert_loss")
  return total
