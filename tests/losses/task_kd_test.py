"""Task and logit-KD losses against numpy references and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evl_ecg_jax import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _bce_np(logits, labels):
  p = _sigmoid(logits)
  return np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _kd_np(t, s, temp):
  p, q = _sigmoid(t / temp), _sigmoid(s / temp)
  kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  return temp**2 * kl.mean()


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2


def test_bce_matches_numpy(logits):
  z, _ = logits
  y = (np.random.default_rng(1).random((6, 5)) < 0.4).astype(np.float64)
  assert float(losses.sigmoid_bce_loss(z, y)) == pytest.approx(
      _bce_np(z, y), rel=1e-5)


def test_bce_mask_equals_dropping_examples(logits):
  z, _ = logits
  y = (np.random.default_rng(1).random((6, 5)) < 0.4).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  assert float(losses.sigmoid_bce_loss(z, y, mask=mask)) == pytest.approx(
      float(losses.sigmoid_bce_loss(z[mask], y[mask])), rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_matches_numpy(logits, temp):
  t, s = logits
  assert float(losses.logit_kd_loss(t, s, temperature=temp)) == pytest.approx(
      _kd_np(t, s, temp), rel=1e-5)


def test_kd_zero_iff_equal_and_gradient_vanishes_there(logits):
  t, s = logits
  assert float(losses.logit_kd_loss(t, t, temperature=2.0)) == pytest.approx(
      0.0, abs=1e-7)
  assert float(losses.logit_kd_loss(t, s, temperature=2.0)) > 1e-3
  g = jax.grad(lambda s_: losses.logit_kd_loss(t, s_, temperature=2.0))(t)
  np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_kd_gradient_matches_finite_differences(logits):
  t, s = (jnp.asarray(x, jnp.float32) for x in logits)
  f = lambda s_: losses.logit_kd_loss(t, s_, temperature=2.0)
  g = jax.grad(f)(s)
  rng = np.random.default_rng(3)
  for _ in range(3):
    d = jnp.asarray(rng.normal(size=s.shape), jnp.float32)
    eps = 1e-2
    fd = (f(s + eps * d) - f(s - eps * d)) / (2 * eps)
    assert float(jnp.vdot(g, d)) == pytest.approx(float(fd), rel=2e-2)


def test_bf16_inputs_give_finite_f32(logits):
  t, s = (jnp.asarray(x, jnp.bfloat16) for x in logits)
  for value in (losses.logit_kd_loss(t, s, temperature=2.0),
                losses.sigmoid_bce_loss(s, (t > 0).astype(jnp.bfloat16))):
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
  g = jax.grad(lambda s_: losses.logit_kd_loss(t, s_, temperature=2.0))(s)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(g)))


def test_objective_combines_terms(logits):
  t, s = logits
  y = (t > 0).astype(np.float32)
  student_out, teacher_out = (jnp.asarray(s), {}), (jnp.asarray(t), {})
  kd = dict(kd=dict(weight=1.0, temperature=2.0))
  ce_only = losses.build_objective(alpha=0.0, terms=kd)
  total, terms = ce_only(None, student_out, None, y)  # no teacher at α = 0
  assert set(terms) == {"ce"} and float(total) == float(terms["ce"])
  alpha = 0.3
  total, terms = losses.build_objective(alpha=alpha, terms=kd)(
      None, student_out, teacher_out, y)
  expected = ((1 - alpha) * _bce_np(s, y) + alpha * _kd_np(t, s, 2.0))
  assert float(total) == pytest.approx(expected, rel=1e-5)
