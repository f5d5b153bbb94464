"""XResNet1D: the strong PTB-XL baseline (Strodthoff et al. 2021).

fastai's XResNet (He et al. 2019, "Bag of tricks", ResNet-D) in 1-D, as used
by Strodthoff et al., "Deep learning for ECG analysis: benchmarks and
insights from PTB-XL" (xresnet1d50/101): a 3-conv stem, max-pool, four
stages of basic (expansion 1) or bottleneck (expansion 4) blocks with
kernel size 5, average-pool shortcuts, zero-initialised last norm of each
residual branch, and concat (average + max) pooling before the head.

Deviation, on purpose: GroupNorm replaces BatchNorm, so the model is a pure
function of its params (no batch statistics to carry in the train state or
to synchronise across devices, and the same result at any per-device batch
size, which on a pod or under FSDP can be 1-4 examples).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class XResBlock(nn.Module):
  """Basic (expansion 1) or bottleneck (expansion 4) block, ResNet-D shortcut."""
  width: int  # bottleneck width; the output has width * expansion.
  expansion: int
  stride: int
  kernel_size: int = 5
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = self.width * self.expansion
    conv = lambda w, k, s, i: layers.conv(w, k, s, use_bias=False,
                                          name=f"conv{i}", **kw)
    gn = lambda i, zero=False: layers.norm("group", zero_init=zero,
                                           name=f"norm{i}", **kw)
    if self.expansion == 1:
      specs = [(self.width, self.kernel_size, self.stride)]
    else:
      specs = [(self.width, 1, 1), (self.width, self.kernel_size, self.stride)]
    y = x
    for i, (w, k, s) in enumerate(specs):
      y = nn.relu(gn(i)(conv(w, k, s, i)(y)))
    n = len(specs)
    y = gn(n, zero=True)(conv(out, 1 if self.expansion > 1 else
                              self.kernel_size, 1, n)(y))
    if self.stride != 1:  # ResNet-D: average-pool, then 1x1 conv.
      x = nn.avg_pool(x, window_shape=(self.stride,),
                      strides=(self.stride,), padding="SAME",
                      count_include_pad=False).astype(self.dtype)
    if x.shape[-1] != out:
      x = layers.norm("group", name="norm_skip", **kw)(
          layers.conv(out, 1, use_bias=False, name="skip", **kw)(x))
    return nn.relu(x + y)


class XResNet1D(nn.Module):
  """XResNet1D over the selected leads.

  Time is downsampled by stem_stride x 2 (max-pool) x 2^3 (stages 2-4):
  with stem_stride=2 (Strodthoff et al.) a 1000-sample ECG gives 32 tokens,
  with stem_stride=1 it gives 63. Tokens are the final feature-map
  positions, of width widths[-1] * expansion.

  Returns (logits [B, C], {tap: hidden}) for the `taps` asked for, from
  "stem", "stage{s}", "tokens" (= the last stage) and "pooled"
  ([B, 2 * width]: average and max pooling concatenated).
  """
  num_classes: int
  stem_widths: Sequence[int]
  widths: Sequence[int]
  blocks: Sequence[int]
  expansion: int = 1
  kernel_size: int = 5
  stem_stride: int = 2
  leads: str = "all"
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False,
               taps: Optional[Sequence[str]] = layers.DEFAULT_TAPS):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if len(self.widths) != len(self.blocks):
      raise ValueError(f"XResNet1D: widths {tuple(self.widths)} and blocks "
                       f"{tuple(self.blocks)} must have the same length.")
    record = layers.Taps("XResNet1D", taps)
    x = layers.select_leads(ecg, self.leads).astype(self.dtype)
    for i, w in enumerate(self.stem_widths):
      x = layers.conv(w, self.kernel_size, self.stem_stride if i == 0 else 1,
                      use_bias=False, name=f"stem{i}", **kw)(x)
      x = nn.relu(layers.norm("group", name=f"stem_norm{i}", **kw)(x))
    x = record("stem", nn.max_pool(x, window_shape=(3,), strides=(2,),
                                    padding="SAME"))
    for s, (width, n) in enumerate(zip(self.widths, self.blocks)):
      for b in range(n):
        x = XResBlock(width, self.expansion, 2 if s > 0 and b == 0 else 1,
                      self.kernel_size, name=f"stage{s}_block{b}", **kw)(x)
      x = record(f"stage{s}", layers.constrain(
          x, ("batch", "length", "channels")))
    pooled = jnp.concatenate([x.mean(axis=1), x.max(axis=1)], axis=-1)
    head = layers.ClassifierHead(self.num_classes, self.dropout,
                                 self.param_dtype)
    return layers.finish(record, head, x, pooled, train=train)
