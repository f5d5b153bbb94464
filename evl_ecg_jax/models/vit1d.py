"""1-D ViT over (lead, time) patches: the teacher signal encoder."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ViT1D(nn.Module):
  """ViT over (lead group, time) patches.

  The leads are split into `lead_groups` equal groups (1: every patch spans
  all leads; 12: one lead per patch) and time into `patch_size`-sample
  steps, giving lead_groups x T / patch_size tokens, each embedded linearly
  and tagged with a learned group and time embedding. A 12-lead 1000-sample
  ECG with lead_groups=1, patch_size=4 gives 250 tokens (40 ms each).
  With `stem_features` > 0 each group first goes through a shared 1-D conv
  (a convolutional patch stem: Xiao et al. 2021, "Early convolutions help
  transformers see better"), which trains much faster on small data.

  Returns (logits [B, C], {"tokens": [B, N, D], "pooled": [B, D]}).
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  lead_groups: int = 1
  stem_features: int = 0
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False):
    batch, samples, leads = ecg.shape
    groups = self.lead_groups
    if samples % self.patch_size or leads % groups:
      raise ValueError(
          f"ViT1D: input of {samples} samples x {leads} leads does not split "
          f"into patch_size={self.patch_size} x lead_groups={groups} "
          "patches (both must divide).")
    steps = samples // self.patch_size
    x = ecg.astype(self.dtype).reshape(batch, samples, groups, -1)
    x = x.transpose(0, 2, 1, 3)  # [B, G, T, leads per group]
    if self.stem_features:
      x = nn.gelu(nn.Conv(self.stem_features, (9,), dtype=self.dtype,
                          name="stem")(x))
    patches = x.reshape(batch, groups, steps, -1)  # [B, G, steps, patch*F]
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(patches)
    init = nn.initializers.normal(0.02)
    x = x + self.param("group_embed", init, (groups, 1, self.width))
    x = x + self.param("time_embed", init, (1, steps, self.width))
    x = x.reshape(batch, groups * steps, self.width).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = layers.EncoderBlock(self.num_heads, self.mlp_dim, self.dropout,
                              self.dtype, name=f"block{i}")(x, train=train)
    tokens = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    pooled = tokens.mean(axis=1)
    logits = layers.ClassifierHead(self.num_classes, self.dropout)(
        pooled, train=train)
    return logits, {"tokens": tokens, "pooled": pooled}
