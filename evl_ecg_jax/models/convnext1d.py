"""ConvNeXt-1D: a modern all-convolutional encoder (Liu et al. 2022) in 1-D."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ConvNeXtBlock(nn.Module):
  """Depthwise conv (k=7) -> LayerNorm -> MLP (4x, GELU) -> layer scale."""
  kernel_size: int = 7
  layer_scale_init: float = 1e-6
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    y = layers.conv(width, self.kernel_size, feature_group_count=width,
                    name="dwconv", **kw)(x)
    y = layers.norm("layer", name="norm", **kw)(y)
    y = nn.gelu(layers.dense(4 * width, ("channels", "mlp"), name="fc1",
                             **kw)(y))
    y = layers.dense(width, ("mlp", "channels"), name="fc2", **kw)(y)
    gamma = self.param("layer_scale", nn.with_logical_partitioning(
        nn.initializers.constant(self.layer_scale_init), ("norm",)),
                       (width,), self.param_dtype)
    return x + gamma.astype(self.dtype) * y


class ConvNeXt1D(nn.Module):
  """Patchify stem (kernel = stride = stem_stride), then stages separated by
  LayerNorm + stride-2 convs; stochastic depth is left out.

  Time is downsampled by stem_stride x 2^(stages - 1): stem_stride=2 with 4
  stages gives 63 tokens for a 1000-sample ECG.

  Returns (logits [B, C], {tap: hidden}) for the `taps` asked for, from
  "stem", "stage{s}", "tokens" (final LayerNorm, [B, M, widths[-1]]) and
  "pooled" ([B, widths[-1]]).
  """
  num_classes: int
  widths: Sequence[int]
  depths: Sequence[int]
  stem_stride: int = 2
  kernel_size: int = 7
  leads: str = "all"
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False,
               taps: Optional[Sequence[str]] = layers.DEFAULT_TAPS):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if len(self.widths) != len(self.depths):
      raise ValueError(f"ConvNeXt1D: widths {tuple(self.widths)} and depths "
                       f"{tuple(self.depths)} must have the same length.")
    record = layers.Taps("ConvNeXt1D", taps)
    x = layers.select_leads(ecg, self.leads).astype(self.dtype)
    x = layers.conv(self.widths[0], self.stem_stride, self.stem_stride,
                    name="stem", **kw)(x)
    x = record("stem", layers.norm("layer", name="stem_norm", **kw)(x))
    for s, (width, depth) in enumerate(zip(self.widths, self.depths)):
      if s > 0:
        x = layers.norm("layer", name=f"down{s}_norm", **kw)(x)
        x = layers.conv(width, 2, 2, name=f"down{s}", **kw)(x)
      for b in range(depth):
        x = ConvNeXtBlock(self.kernel_size, name=f"stage{s}_block{b}",
                          **kw)(x)
      x = record(f"stage{s}", layers.constrain(
          x, ("batch", "length", "channels")))
    tokens = layers.norm("layer", name="norm_final", **kw)(x)
    head = layers.ClassifierHead(self.num_classes, self.dropout,
                                 self.param_dtype)
    return layers.finish(record, head, tokens, tokens.mean(axis=1),
                         train=train)
