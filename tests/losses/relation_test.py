"""relation_loss against the numpy reference, and its invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from evl_ecg_jax import losses
from reference.relation_np import relation_loss_np


def _tokens(seed, b=3, n=7, dt=5, ds=4):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, n, dt)), rng.normal(size=(b, n, ds))


@pytest.mark.parametrize("seed", range(4))
def test_matches_numpy_reference(seed):
  t, s = _tokens(seed)
  assert float(losses.relation_loss(t, s)) == pytest.approx(
      relation_loss_np(t, s), rel=1e-5)


def test_mask_equals_dropping_tokens():
  t, s = _tokens(0, b=1, n=9)
  mask = np.array([[1, 1, 0, 1, 1, 0, 1, 1, 1]], bool)
  keep = mask[0]
  assert float(losses.relation_loss(t, s, mask=mask)) == pytest.approx(
      float(losses.relation_loss(t[:, keep], s[:, keep])), rel=1e-5)
  assert float(losses.relation_loss(t, s, mask=mask)) == pytest.approx(
      relation_loss_np(t, s, mask), rel=1e-5)


def test_zero_for_identical_geometry_and_invariances():
  t, s = _tokens(1, dt=3, ds=3)
  rot = Rotation.random(random_state=0).as_matrix()
  assert float(losses.relation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
  # Rotation and uniform scale of the student leave both terms unchanged.
  base = float(losses.relation_loss(t, s))
  assert float(losses.relation_loss(t, 3.0 * s @ rot.T)) == pytest.approx(
      base, rel=1e-5)
  # A rotated, scaled copy has the same relations: loss 0.
  assert float(losses.relation_loss(t, 2.5 * t @ rot.T)) == pytest.approx(
      0.0, abs=1e-6)
  # Translation changes cosines but not the normalised distances.
  shifted = float(losses.relation_loss(t, t + 5.0))
  assert shifted > 1e-3


def test_gradient_finite_with_duplicate_tokens_and_matches_fd():
  t, s = (jnp.asarray(x, jnp.float32) for x in _tokens(2))
  s = s.at[:, 1].set(s[:, 0])  # zero distance off the diagonal
  f = lambda s_: losses.relation_loss(t, s_)
  g = jax.grad(f)(s)
  assert np.all(np.isfinite(g))
  s2 = jnp.asarray(_tokens(3)[1], jnp.float32)
  g2 = jax.grad(f)(s2)
  # Along the gradient plus noise, so the slope dwarfs f32 rounding in f.
  noise = np.random.default_rng(5).normal(size=s2.shape)
  d = g2 / jnp.linalg.norm(g2) + 0.3 * jnp.asarray(
      noise / np.linalg.norm(noise), jnp.float32)
  eps = 1e-2
  fd = (f(s2 + eps * d) - f(s2 - eps * d)) / (2 * eps)
  assert float(jnp.vdot(g2, d)) == pytest.approx(float(fd), rel=2e-2)


def test_bf16_inputs_give_finite_f32():
  t, s = (jnp.asarray(x, jnp.bfloat16) for x in _tokens(4))
  value = losses.relation_loss(t, s)
  assert value.dtype == jnp.float32 and np.isfinite(float(value))
  assert float(value) == pytest.approx(
      relation_loss_np(np.float32(t), np.float32(s)), rel=2e-2)


def test_length_mismatch_is_an_error():
  t, s = _tokens(0)
  with pytest.raises(ValueError, match="align the teacher first"):
    losses.relation_loss(t, s[:, :5])


def test_teacher_side_invariances():
  t, s = _tokens(5, dt=3, ds=3)
  rot = Rotation.random(random_state=1).as_matrix()
  base = float(losses.relation_loss(t, s))
  assert float(losses.relation_loss(0.2 * t @ rot.T, s)) == pytest.approx(
      base, rel=1e-5)
  # L_D alone is translation invariant; L_A (cosines) is not, by definition.
  pairs = jnp.asarray(~np.eye(7, dtype=bool), jnp.float32)[None]
  d = losses.relation.normalized_distances(jnp.asarray(t, jnp.float32), pairs)
  d_shift = losses.relation.normalized_distances(
      jnp.asarray(t + 7.0, jnp.float32), pairs)
  np.testing.assert_allclose(d_shift, d, rtol=1e-4, atol=1e-5)


def test_large_inputs_and_single_token_masks_stay_finite():
  t, s = (jnp.asarray(x, jnp.float32) for x in _tokens(6))
  f = lambda t_, s_, m=None: losses.relation_loss(t_, s_, mask=m)
  # Scale invariance holds at large magnitude too.
  assert float(f(1e3 * t, 1e3 * s)) == pytest.approx(float(f(t, s)), rel=1e-4)
  one = np.zeros((3, 7), bool)
  one[:, 0] = True
  for args in ((1e3 * t, 1e3 * s), (t, s, one)):
    value, grads = jax.value_and_grad(f, argnums=(0, 1))(*args)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in grads)
  assert float(f(t, s, one)) == 0.0  # no pair i != j left


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_far_from_the_origin_matches_the_float64_reference(offset):
  """relation_loss takes distances and cosines from one centred Gram
  matrix: tokens far from the origin with a small spread (cosines near 1,
  distances much smaller than the norms) still match numpy in float64."""
  t, s = _tokens(5, n=16, dt=32, ds=24)
  t, s = t + offset, 0.3 * s + offset
  assert float(losses.relation_loss(t.astype(np.float32),
                                    s.astype(np.float32))) == pytest.approx(
                                        relation_loss_np(t, s), rel=1e-4)
