"""Building blocks shared by the ECG encoders."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dropout -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer encoder block (ViT)."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        deterministic=not train, name="attn")(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        y, train=train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ClassifierHead(nn.Module):
  """Dropout + Dense to `num_classes` logits, computed in float32."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, pooled, *, train: bool):
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)
