"""Numerics shared by the loss functions (one copy of each helper)."""

from __future__ import annotations

import jax.numpy as jnp


def f32(*xs):
  """Upcasts arrays to float32 (losses compute in f32 even for bf16 inputs)."""
  out = tuple(jnp.asarray(x, jnp.float32) for x in xs)
  return out if len(out) > 1 else out[0]


def masked_mean(x, mask=None):
  """Mean of `x` over entries where `mask` (broadcastable, True = valid)."""
  if mask is None:
    return jnp.mean(x)
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
