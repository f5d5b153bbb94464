"""Small residual 1-D CNN: the default edge student."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ResBlock1D(nn.Module):
  """Conv-GN-GELU-Conv-GN residual block; strided when `stride` > 1."""
  width: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.gelu(layers.norm("group", name="gn1", **kw)(
        layers.conv(self.width, 5, self.stride, name="conv1", **kw)(x)))
    y = layers.norm("group", name="gn2", **kw)(
        layers.conv(self.width, 5, name="conv2", **kw)(y))
    if self.stride != 1 or x.shape[-1] != self.width:
      x = layers.norm("group", name="gn_skip", **kw)(
          layers.conv(self.width, 1, self.stride, name="skip", **kw)(x))
    return nn.gelu(x + y)


class CNN1D(nn.Module):
  """Stem + stages of residual blocks; each stage halves the time axis.

  With 4 stages a 1000-sample ECG gives ceil(1000 / 16) = 63 tokens of width
  `widths[-1]` (the final feature-map positions).

  Returns (logits [B, C], {tap: hidden}) for the `taps` asked for, from
  "stem", "stage{s}" (after stage s), "tokens" (= the last stage, [B, M, D])
  and "pooled" ([B, D]).
  """
  num_classes: int
  widths: Sequence[int]
  blocks_per_stage: int = 1
  leads: str = "all"
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False,
               taps: Optional[Sequence[str]] = layers.DEFAULT_TAPS):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    record = layers.Taps("CNN1D", taps)
    x = layers.select_leads(ecg, self.leads).astype(self.dtype)
    x = record("stem", layers.conv(self.widths[0], 7, name="stem", **kw)(x))
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        x = ResBlock1D(width, 2 if b == 0 else 1, name=f"stage{s}_block{b}",
                       **kw)(x)
      x = record(f"stage{s}", layers.constrain(
          x, ("batch", "length", "channels")))
    head = layers.ClassifierHead(self.num_classes, self.dropout,
                                 self.param_dtype)
    return layers.finish(record, head, x, x.mean(axis=1), train=train)
