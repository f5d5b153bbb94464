"""FitNets and TinyBERT losses against numpy references,
with their invariances, masks and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evl_ecg_jax.losses import hints
from reference.hints_np import mse_np, tinybert_np

B, N, DT, DS, H = 2, 5, 6, 4, 2


def _normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


def _regressor():
  reg = hints.HintRegressor(DT)
  return reg, reg.init(jax.random.PRNGKey(0), jnp.ones((1, N, DS)))


def test_fitnet_matches_numpy_and_trains_the_regressor():
  t, s = _normal(0, B, N, DT), _normal(1, B, N, DS)
  reg, params = _regressor()
  projected = reg.apply(params, s)
  assert projected.shape == (B, N, DT)
  assert float(hints.fitnet_loss(t, projected)) == pytest.approx(
      mse_np(t, np.float64(projected)), rel=1e-5)
  g = jax.grad(lambda p: hints.fitnet_loss(t, reg.apply(p, s)))(params)
  kernel = g["params"]["proj"]["kernel"]
  assert kernel.shape == (DS, DT) and float(jnp.abs(kernel).max()) > 1e-3


def test_fitnet_mask_equals_dropping_tokens_and_shape_error():
  t, s = _normal(0, 1, N, DT), _normal(1, 1, N, DT)
  mask = np.array([[1, 0, 1, 1, 0]], bool)
  assert float(hints.fitnet_loss(t, s, mask=mask)) == pytest.approx(
      float(hints.fitnet_loss(t[mask][None], s[mask][None])), rel=1e-6)
  assert float(hints.fitnet_loss(t, s, mask=mask)) == pytest.approx(
      mse_np(t, s, mask), rel=1e-5)
  with pytest.raises(ValueError, match="project the student"):
    hints.fitnet_loss(t, s[..., :DS])


def _layers(seed, batch=B):
  th = [_normal(seed + i, batch, N, DT) for i in range(3)]
  sh = [_normal(seed + 10 + i, batch, N, DS) for i in range(2)]
  ta = [_normal(seed + 20 + i, batch, H, N, N) for i in range(3)]
  sa = [_normal(seed + 30 + i, batch, H, N, N) for i in range(2)]
  return th, sh, ta, sa


LAYER_MAP = [(0, 1), (1, 2)]


def test_tinybert_matches_numpy_with_and_without_attention():
  th, sh, ta, sa = _layers(0)
  w = _normal(40, DS, DT)
  project = lambda h: h @ w
  assert float(hints.tinybert_loss(th, sh, ta, sa, layer_map=LAYER_MAP,
                                   projection=project)) == pytest.approx(
      tinybert_np(th, sh, ta, sa, LAYER_MAP, w), rel=1e-5)
  assert float(hints.tinybert_loss(th, sh, layer_map=LAYER_MAP,
                                   projection=project)) == pytest.approx(
      tinybert_np(th, sh, None, None, LAYER_MAP, w), rel=1e-5)
  mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], bool)
  assert float(hints.tinybert_loss(th, sh, ta, sa, layer_map=LAYER_MAP,
                                   projection=project, mask=mask)) == (
      pytest.approx(tinybert_np(th, sh, ta, sa, LAYER_MAP, w, mask),
                    rel=1e-5))
  with pytest.raises(ValueError, match="or neither"):
    hints.tinybert_loss(th, sh, ta, None, layer_map=LAYER_MAP,
                        projection=project)


def test_tinybert_mask_equals_dropping_tokens_with_a_hint_regressor():
  th, sh, ta, sa = _layers(1, batch=1)
  reg, params = _regressor()
  keep = np.array([1, 0, 1, 1, 0], bool)
  f = lambda p, th, sh, ta, sa, mask=None: hints.tinybert_loss(
      th, sh, ta, sa, layer_map=LAYER_MAP,
      projection=lambda h: reg.apply(p, h), mask=mask)
  dropped = f(params, [x[:, keep] for x in th], [x[:, keep] for x in sh],
              [x[:, :, keep][..., keep] for x in ta],
              [x[:, :, keep][..., keep] for x in sa])
  assert float(f(params, th, sh, ta, sa, keep[None])) == pytest.approx(
      float(dropped), rel=1e-6)
  g = jax.grad(f)(params, th, sh, ta, sa, keep[None])
  assert float(jnp.abs(g["params"]["proj"]["kernel"]).max()) > 1e-3
