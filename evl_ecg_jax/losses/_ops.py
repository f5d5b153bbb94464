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


# The global batch under data parallelism (docs/scale.md, "One objective on
# any number of devices"). A per-device step (pmap, shard_map) sees b of the
# B = n·b rows; under spmd (axis_name=None) it sees all B. Every term that
# normalises or compares across records returns, on every device, the value
# of the global batch, with a gradient such that the step's pmean of the
# per-device gradients is the global batch's gradient: a device's gradient
# is n × its own rows' part of it. A mean over a device's rows has that
# property as it is (equal rows per device); what crosses records goes
# through the helpers below.


def axis_size(axis_name) -> int:
  """Devices along `axis_name` (1 for None: the call sees every row)."""
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def global_rows(x, axis_name):
  """[b, ...] of this device -> [B, ...] of every device, in device order.

  all_gather's transpose is a reduce-scatter: each device's rows get the
  sum over devices of the cotangents of their copy, n × the gradient of a
  value that every device computes alike (the convention above).
  """
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


def own_rows(axis_name, b: int):
  """Indices [b] of this device's rows in `global_rows`'s order."""
  if axis_name is None:
    return jnp.arange(b)
  return jax.lax.axis_index(axis_name) * b + jnp.arange(b)


def _from_device(x, offset, axis_name):
  """x of the device `offset` places before this one (cyclically)."""
  n = axis_size(axis_name)
  if offset % n == 0:
    return x
  return jax.lax.ppermute(x, axis_name,
                          [(i, (i + offset) % n) for i in range(n)])


def global_roll(x, shift: int, axis_name):
  """`jnp.roll(global_rows(x), shift, axis=0)`'s rows of this device.

  Row r of the global batch gets row r − shift (mod B). Moves only the
  rows that cross devices (`ppermute`s; a shift of 1 sends one row per
  device), never the global batch. No gradient is expected through it (the
  teacher's side).
  """
  if axis_name is None:
    return jnp.roll(x, shift, axis=0)
  b = x.shape[0]
  shift %= b * axis_size(axis_name)
  whole, part = divmod(shift, b)
  if not part:
    return _from_device(x, whole, axis_name)
  return jnp.concatenate([_from_device(x[b - part:], whole + 1, axis_name),
                          _from_device(x[:b - part], whole, axis_name)],
                         axis=0)


def global_sum(x, axis_name):
  """Σ over the axis of a per-device part of a global value (e.g. a sum
  over this device's rows of something computed on `global_rows`): the
  value of the sum, the gradient of n · x (the convention above)."""
  if axis_name is None:
    return x
  value = jax.lax.psum(jax.lax.stop_gradient(x), axis_name)
  share = axis_size(axis_name) * x
  return share + jax.lax.stop_gradient(value - share)


def masked_mean(x, mask=None, *, axis_name=None):
  """Mean of `x` over entries where `mask` (broadcastable, True = valid).

  With `axis_name`, the mean over the valid entries of every device's rows
  (Σ values / Σ counts, both summed over the axis), not a mean of
  per-device means: a device without a valid entry weighs nothing. The
  gradient is that of n · (this device's sum) / (global count), so that
  the step's pmean gives the global gradient; no gradient goes through the
  collective.
  """
  x = jnp.asarray(x)
  if mask is None:
    total, count = jnp.sum(x), jnp.asarray(x.size, x.dtype)
  else:
    mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    total, count = jnp.sum(x * mask), jnp.sum(mask)
  if axis_name is not None:
    count = jax.lax.psum(jax.lax.stop_gradient(count), axis_name)
  return global_sum(total, axis_name) / jnp.maximum(count, 1.0)


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


def unit_rows(x, eps=1e-8):
  """x / ‖x‖ along the last axis, finite (with a finite gradient) at 0."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps**2)


def cosine_matrix(x, eps=1e-8):
  """Cosine similarities [..., N, N] between the rows of x [..., N, D]."""
  unit = unit_rows(x, eps)
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
