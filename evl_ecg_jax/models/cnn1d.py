"""Small residual 1-D CNN: the student signal encoder."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ResBlock1D(nn.Module):
  """Conv-GN-GELU-Conv-GN residual block; strided when `stride` > 1."""
  width: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda w, k, s, n: nn.Conv(w, (k,), (s,), dtype=self.dtype, name=n)
    norm = lambda n: nn.GroupNorm(num_groups=None, group_size=8,
                                  dtype=self.dtype, name=n)
    y = nn.gelu(norm("gn1")(conv(self.width, 5, self.stride, "conv1")(x)))
    y = norm("gn2")(conv(self.width, 5, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.width:
      x = norm("gn_skip")(conv(self.width, 1, self.stride, "skip")(x))
    return nn.gelu(x + y)


class CNN1D(nn.Module):
  """Stem + stages of residual blocks; each stage halves the time axis.

  With 4 stages a 1000-sample ECG gives ceil(1000 / 16) = 63 tokens of width
  `widths[-1]` (the final feature-map positions).

  Returns (logits [B, C], {"tokens": [B, M, D], "pooled": [B, D]}).
  """
  num_classes: int
  widths: Sequence[int]
  blocks_per_stage: int = 1
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False):
    x = nn.Conv(self.widths[0], (7,), dtype=self.dtype, name="stem")(
        ecg.astype(self.dtype))
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        x = ResBlock1D(width, 2 if b == 0 else 1, self.dtype,
                       name=f"stage{s}_block{b}")(x)
    tokens = x
    pooled = tokens.mean(axis=1)
    logits = layers.ClassifierHead(self.num_classes, self.dropout)(
        pooled, train=train)
    return logits, {"tokens": tokens, "pooled": pooled}
