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


def pairwise_distances(x):
  """Euclidean distances [..., N, N] between the rows of x [..., N, D].

  Computed from differences (not the Gram expansion, which cancels
  catastrophically for nearby points) with a gradient-safe square root: the
  diagonal is exactly 0 with a zero (not NaN) gradient.
  """
  diff = x[..., :, None, :] - x[..., None, :, :]
  sq = jnp.sum(diff * diff, axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def cosine_matrix(x, eps=1e-8):
  """Cosine similarities [..., N, N] between the rows of x [..., N, D]."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps**2)
  unit = x / norm
  return jnp.einsum("...id,...jd->...ij", unit, unit)


def pair_mask(mask, n):
  """[B, N, N] float mask of pairs i != j of valid tokens (mask [B, N])."""
  off_diagonal = ~jnp.eye(n, dtype=bool)
  if mask is None:
    return off_diagonal.astype(jnp.float32)[None]
  mask = jnp.asarray(mask, bool)
  return (mask[:, :, None] & mask[:, None, :] & off_diagonal).astype(
      jnp.float32)
