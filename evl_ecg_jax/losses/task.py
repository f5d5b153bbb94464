"""Task losses on the labels (the L_CE term of EVL-ECG and of the baselines)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from evl_ecg_jax.losses import _ops


def sigmoid_bce_loss(logits, labels, *, mask=None, axis_name=None):
  """Multi-label binary cross-entropy, L_CE for ECG diagnosis (EVL-ECG Eq. 1).

  Args:
    logits: [B, C] raw scores.
    labels: [B, C] multi-hot targets in {0, 1} (soft targets allowed).
    mask: optional [B] bool, True = example has labels (semi-supervised).
    axis_name: data axis of a per-device step: the mean is over the valid
      examples of every device (`_ops.masked_mean`); None: of this call.

  Returns:
    Scalar float32: mean over classes and valid examples.
  """
  logits, labels = _ops.f32(logits, labels)
  per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
  return _ops.masked_mean(per_example, mask, axis_name=axis_name)


def softmax_ce_loss(logits, labels, *, mask=None, label_smoothing=0.0,
                    axis_name=None):
  """Single-label cross-entropy with optional label smoothing.

  L_CE = −Σ_c y'_c log softmax(z)_c with y' = (1 − ε) y + ε / C (Szegedy et
  al. 2016, label smoothing ε).

  Args:
    logits: [B, C] raw scores (any leading shape [..., C] works).
    labels: int class ids [B] (ndim = logits.ndim − 1) or one-hot / soft
      targets [B, C] (ndim = logits.ndim).
    mask: optional bool with the leading shape of `logits` ([B]), True =
      counts.
    label_smoothing: ε in [0, 1).
    axis_name: as in `sigmoid_bce_loss`.

  Returns:
    Scalar float32: mean over the valid examples (0 if none is valid).
  """
  logits = _ops.f32(logits)
  if jnp.ndim(labels) == logits.ndim - 1:
    labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  elif jnp.shape(labels) != logits.shape:
    raise ValueError(f"softmax_ce_loss: labels {jnp.shape(labels)} must be "
                     f"class ids {logits.shape[:-1]} or targets "
                     f"{logits.shape}.")
  labels = optax.smooth_labels(_ops.f32(labels), label_smoothing)
  return _ops.masked_mean(optax.softmax_cross_entropy(logits, labels), mask,
                          axis_name=axis_name)


def token_ce_loss(logits, targets, *, mask=None, axis_name=None):
  """Language-model cross-entropy averaged over the valid tokens.

  L = −(1/|V|) Σ_{(b,l) ∈ V} log softmax(z_bl)[y_bl], V the valid tokens
  (e.g. the answer tokens of a report).

  Args:
    logits: [B, L, V] next-token scores.
    targets: [B, L] int token ids.
    mask: optional [B, L] bool, True = token counts.
    axis_name: data axis of a per-device step: the mean is over the valid
      tokens of every device (a global token mean, not a mean of
      per-device means); None: of this call.

  Returns:
    Scalar float32: mean over the valid tokens; 0 when none is valid.
  """
  if jnp.ndim(logits) != 3 or jnp.shape(targets) != jnp.shape(logits)[:2]:
    raise ValueError(f"token_ce_loss: logits {jnp.shape(logits)} must be "
                     f"[B, L, V] and targets {jnp.shape(targets)} [B, L].")
  return softmax_ce_loss(logits, targets, mask=mask, axis_name=axis_name)
