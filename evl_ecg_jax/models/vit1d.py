"""1-D ViT over (lead, time) patches: the teacher signal encoder."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ViT1D(nn.Module):
  """Each lead is cut into non-overlapping `patch_size`-sample patches.

  A 12-lead, 1000-sample ECG with `patch_size=50` gives 12 x 20 = 240 tokens,
  each embedded linearly and tagged with a learned lead and time embedding.

  Returns (logits [B, C], {"tokens": [B, N, D], "pooled": [B, D]}).
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False):
    batch, samples, leads = ecg.shape
    if samples % self.patch_size:
      raise ValueError(f"ViT1D: {samples} samples per lead are not divisible "
                       f"by patch_size={self.patch_size}.")
    steps = samples // self.patch_size
    patches = ecg.reshape(batch, steps, self.patch_size, leads)
    patches = patches.transpose(0, 3, 1, 2)  # [B, leads, steps, patch]
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(patches)
    init = nn.initializers.normal(0.02)
    x = x + self.param("lead_embed", init, (leads, 1, self.width))
    x = x + self.param("time_embed", init, (1, steps, self.width))
    x = x.reshape(batch, leads * steps, self.width).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = layers.EncoderBlock(self.num_heads, self.mlp_dim, self.dropout,
                              self.dtype, name=f"block{i}")(x, train=train)
    tokens = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    pooled = tokens.mean(axis=1)
    logits = layers.ClassifierHead(self.num_classes, self.dropout)(
        pooled, train=train)
    return logits, {"tokens": tokens, "pooled": pooled}
