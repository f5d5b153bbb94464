"""The global-batch helpers of losses/_ops.py under pmap on 8 fake devices
against numpy on the whole batch: values, and the gradient convention (each
device's gradient is n x its rows' part, so pmean = the global gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evl_ecg_jax.losses import _ops

N = 8  # fake devices (tests/conftest.py)


def _per_device(x):
  return x.reshape((N, -1) + x.shape[1:])


@pytest.mark.parametrize("b", [1, 2, 3])
@pytest.mark.parametrize("shift", [1, 2, 5, 9, -1])
def test_global_roll_is_the_global_batch_s_roll(b, shift):
  x = np.arange(N * b * 2, dtype=np.float32).reshape(N * b, 2)
  out = jax.pmap(functools.partial(_ops.global_roll, shift=shift,
                                   axis_name="i"), axis_name="i")(
                                       _per_device(x))
  np.testing.assert_array_equal(np.asarray(out).reshape(x.shape),
                                np.roll(x, shift, axis=0))


def _pairwise_mean(x):  # a cross-record value: mean pairwise distance²
  return jnp.mean(jnp.sum((x[:, None] - x[None]) ** 2, -1))


@pytest.mark.parametrize("b", [1, 2])
def test_gathered_rows_and_global_sums_follow_the_convention(b):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N * b, 3)).astype(np.float32)
  mask = rng.random(N * b) < 0.4
  mask[0] = True

  def loss(rows, mask):  # per device, a global value
    own = _ops.global_rows(rows, "i")[_ops.own_rows("i", b)]
    relation = _pairwise_mean(_ops.global_rows(rows, "i"))
    masked = _ops.masked_mean(jnp.sum(rows**2, -1), mask, axis_name="i")
    part = _ops.global_sum(jnp.sum(own[:, 0]), "i")
    return relation + masked + part

  def reference(x, mask):
    return (_pairwise_mean(x) + jnp.sum(jnp.sum(x**2, -1) * mask)
            / mask.sum() + jnp.sum(x[:, 0]))

  value, grads = jax.pmap(jax.value_and_grad(loss), axis_name="i")(
      _per_device(x), _per_device(mask))
  want, want_grad = jax.value_and_grad(reference)(x, mask)
  np.testing.assert_allclose(value, np.full(N, want), rtol=1e-5)
  # The step pmeans the per-device gradients of the replicated params; for
  # rows, a device's gradient is n x its own rows' part of the global one.
  np.testing.assert_allclose(np.asarray(grads).reshape(x.shape) / N,
                             want_grad, rtol=1e-5, atol=1e-6)
