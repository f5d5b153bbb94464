"""Numerics shared by the loss functions (one copy of each helper)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def f32(*xs):
  """Upcasts arrays to at least float32 (bf16/f16 -> f32; f64 stays f64).

  Losses compute in f32 even for bf16 inputs; float64 (with jax x64 enabled)
  passes through, so finite-difference tests can run in double precision.
  """
  out = tuple(jnp.asarray(x, jnp.promote_types(jnp.result_type(x),
                                               jnp.float32)) for x in xs)
  return out if len(out) > 1 else out[0]


def masked_mean(x, mask=None):
  """Mean of `x` over entries where `mask` (broadcastable, True = valid)."""
  if mask is None:
    return jnp.mean(x)
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def squared_distances(x, y):
  """C_ij = ‖x_i − y_j‖² [..., N, M] for x [..., N, D], y [..., M, D], >= 0.

  Gram expansion (O(N·M + (N + M)·D) memory, unlike differences, which
  materialise [..., N, M, D]). Both sets are first shifted by a common
  centre (C is translation invariant), which keeps the expansion accurate
  for inputs far from the origin.
  """
  centre = 0.5 * (jnp.mean(x, axis=-2, keepdims=True)
                  + jnp.mean(y, axis=-2, keepdims=True))
  x, y = x - centre, y - centre
  sq = (jnp.sum(x * x, -1)[..., :, None] + jnp.sum(y * y, -1)[..., None, :]
        - 2.0 * jnp.einsum("...id,...jd->...ij", x, y))
  return jnp.maximum(sq, 0.0)


def pairwise_distances(x):
  """Euclidean distances [..., N, N] between the rows of x [..., N, D].

  Gradient-safe square root: the diagonal is exactly 0 with a zero (not
  NaN) gradient, and so is any pair whose squared distance rounds to 0.
  """
  sq = squared_distances(x, x)
  sq = jnp.where(jnp.eye(x.shape[-2], dtype=bool), 0.0, sq)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def distances_and_cosines(x, eps=1e-8):
  """(pairwise_distances(x), cosine_matrix(x)) from one Gram matrix.

  The rows are centred first (as in `squared_distances`); the uncentred
  Gram that the cosines need is the centred one plus a rank-2 correction,
  G = G_c + (x_c·μ) ⊕ (x_c·μ) + μ·μ, so each sequence costs one [N, N, D]
  contraction instead of two (forward and backward).
  """
  mu = jnp.mean(x, axis=-2, keepdims=True)
  xc = x - mu
  gram_c = jnp.einsum("...id,...jd->...ij", xc, xc)
  norm_c = jnp.sum(xc * xc, -1)
  sq = jnp.maximum(norm_c[..., :, None] + norm_c[..., None, :] - 2.0 * gram_c,
                   0.0)
  sq = jnp.where(jnp.eye(x.shape[-2], dtype=bool), 0.0, sq)
  positive = sq > 0
  dist = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  shift = jnp.sum(xc * mu, -1)  # x_c,i · μ
  mu_sq = jnp.sum(mu * mu, -1)  # [..., 1]
  gram = (gram_c + shift[..., :, None] + shift[..., None, :]
          + mu_sq[..., None])
  inv = jax.lax.rsqrt(norm_c + 2.0 * shift + mu_sq + eps**2)
  return dist, gram * inv[..., :, None] * inv[..., None, :]


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


def standardize(x, eps=1e-6):
  """Parameter-free layer norm over the last axis: zero mean, unit RMS.

  Used to make feature losses scale-free (a side cannot lower a loss by
  shrinking). Computed in >= float32.
  """
  x = f32(x)
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def sequence_mean(x, mask=None):
  """Mean over tokens per sequence, then over the batch. x: [B, N], mask [B, N].

  Every sequence weighs the same whatever its number of valid tokens, so a
  mask gives the same value as dropping the masked tokens.
  """
  if mask is None:
    return jnp.mean(x)
  mask = jnp.asarray(mask, x.dtype)
  per_seq = jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
  return jnp.mean(per_seq)


def pool_tokens(x, length: int):
  """Adaptive average pooling of tokens [B, N, D] -> [B, length, D].

  Output token i averages input tokens floor(i·N/L) … ceil((i+1)·N/L) − 1
  (PyTorch's adaptive_avg_pool1d windows), so sequences of different
  lengths can be compared position by position (FitNet, TinyBERT hints
  between a 250-token teacher and a 63-token student).
  """
  n = x.shape[1]
  weights = np.zeros((length, n), np.float32)
  for i in range(length):
    start, stop = (i * n) // length, -((-(i + 1) * n) // length)
    weights[i, start:stop] = 1.0 / (stop - start)
  return jnp.einsum("ln,bnd->bld", weights, f32(x))
