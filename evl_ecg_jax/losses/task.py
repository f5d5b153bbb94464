"""Task losses on the labels (the L_CE term of EVL-ECG)."""

from __future__ import annotations

import optax

from evl_ecg_jax.losses import _ops


def sigmoid_bce_loss(logits, labels, *, mask=None):
  """Multi-label binary cross-entropy, L_CE for ECG diagnosis (EVL-ECG Eq. 1).

  Args:
    logits: [B, C] raw scores.
    labels: [B, C] multi-hot targets in {0, 1} (soft targets allowed).
    mask: optional [B] bool, True = example has labels (semi-supervised).

  Returns:
    Scalar float32: mean over classes and valid examples.
  """
  logits, labels = _ops.f32(logits, labels)
  per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
  return _ops.masked_mean(per_example, mask)
