"""1-D ViT over (lead, time) patches: the teacher signal encoder."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from evl_ecg_jax.models import layers


class ViT1D(nn.Module):
  """ViT over (lead group, time) patches.

  The model reads the leads in `leads` (layers.lead_indices), splits them
  into `lead_groups` equal groups (1: every patch spans all its leads; one
  per lead: a token per lead) and time into `patch_size`-sample steps (the
  signal is zero-padded on the right to a whole number of steps), giving
  lead_groups x ceil(T / patch_size) tokens, each embedded linearly and
  tagged with a learned group and time embedding. A 12-lead 1000-sample ECG
  with lead_groups=1 gives 250 tokens at patch_size=4 (40 ms at 100 Hz) and
  63 at patch_size=16. With `stem_features` > 0 each group first goes
  through a shared 1-D conv (a convolutional patch stem: Xiao et al. 2021,
  "Early convolutions help transformers see better").

  Returns (logits [B, C], {tap: hidden}) for the `taps` asked for, from
  "embed" (after the patch embedding), "block{i}" (after block i),
  "tokens" (final LayerNorm, [B, N, width]) and "pooled" ([B, width]).
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  lead_groups: int = 1
  leads: str = "all"
  stem_features: int = 0
  dropout: float = 0.0
  remat: bool = False  # recompute each block in the backward pass.
  # One nn.scan over the blocks (params "blocks" with a leading "layers"
  # axis) instead of "block{i}": XLA compiles one block, not `depth`.
  scan: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ecg, *, train: bool = False,
               taps: Optional[Sequence[str]] = layers.DEFAULT_TAPS):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    record = layers.Taps("ViT1D", taps)
    x = layers.select_leads(ecg, self.leads).astype(self.dtype)
    batch, samples, leads = x.shape
    groups = self.lead_groups
    if leads % groups:
      raise ValueError(f"ViT1D: {leads} leads ({self.leads!r}) do not split "
                       f"into lead_groups={groups} equal groups.")
    steps = -(-samples // self.patch_size)
    x = jnp.pad(x, ((0, 0), (0, steps * self.patch_size - samples), (0, 0)))
    x = x.reshape(batch, steps * self.patch_size, groups, -1)
    x = x.transpose(0, 2, 1, 3)  # [B, G, T, leads per group]
    if self.stem_features:
      x = nn.gelu(layers.conv(self.stem_features, 9, name="stem", **kw)(x))
    patches = x.reshape(batch, groups, steps, -1)  # [B, G, steps, patch*F]
    x = layers.dense(self.width, ("channels_in", "embed"), name="embed",
                     **kw)(patches)
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                        (None, None, "embed"))
    x = x + self.param("group_embed", init, (groups, 1, self.width),
                       self.param_dtype)
    x = x + self.param("time_embed", init, (1, steps, self.width),
                       self.param_dtype)
    x = x.reshape(batch, groups * steps, self.width).astype(self.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = record("embed", nn.Dropout(self.dropout, deterministic=not train)(x))
    x = layers.encoder_stack(
        x, record, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, dropout=self.dropout, train=train,
        remat=self.remat, scan=self.scan, **kw)
    tokens = layers.norm("layer", name="ln_final", **kw)(x)
    head = layers.ClassifierHead(self.num_classes, self.dropout,
                                 self.param_dtype)
    return layers.finish(record, head, tokens, tokens.mean(axis=1),
                         train=train)
