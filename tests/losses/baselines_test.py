"""Softmax task losses, logit KD baselines and RKD against numpy references,
with their hand-computed cases, invariances, masks and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from sklearn.metrics import log_loss

from evl_ecg_jax.losses import contrastive, hints, kd, relation, task
from reference.kd_np import (crd_np, dist_np, dkd_np, rkd_np, softmax_kd_np,
                             token_ce_np, uld_np)

B, L, C, VS = 4, 3, 6, 5  # batch, tokens, classes / teacher vocab, student


def _normal(seed, *shape, scale=2.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def _labels(seed=9):
  return np.random.default_rng(seed).integers(0, C, size=B)


def _softmax_np(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _assert_fd(f, x, seed=5, eps=1e-2):
  """Directional derivative of f at x vs central differences (float32)."""
  x = jnp.asarray(x, jnp.float32)
  g = jax.grad(f)(x)
  noise = np.random.default_rng(seed).normal(size=x.shape)
  # Along the gradient plus noise, so the slope dwarfs f32 rounding in f.
  d = g / jnp.linalg.norm(g) + 0.3 * jnp.asarray(
      noise / np.linalg.norm(noise), jnp.float32)
  fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
  assert float(jnp.linalg.norm(g)) > 1e-4
  assert float(jnp.vdot(g, d)) == pytest.approx(float(fd), rel=2e-2)


# --- task losses -----------------------------------------------------------


def test_softmax_ce_matches_sklearn_for_ids_and_one_hot():
  z, y = _normal(0, B, C), _labels()
  expected = log_loss(y, _softmax_np(z), labels=range(C))
  assert float(task.softmax_ce_loss(z, y)) == pytest.approx(expected, rel=1e-5)
  assert float(task.softmax_ce_loss(z, np.eye(C)[y])) == pytest.approx(
      expected, rel=1e-5)


def test_softmax_ce_label_smoothing_and_mask():
  z, y = _normal(0, B, C), _labels()
  eps = 0.1
  soft = (1 - eps) * np.eye(C)[y] + eps / C
  expected = np.mean(-np.sum(soft * np.log(_softmax_np(z)), axis=-1))
  assert float(task.softmax_ce_loss(z, y, label_smoothing=eps)) == (
      pytest.approx(expected, rel=1e-5))
  mask = np.array([1, 0, 1, 1], bool)
  assert float(task.softmax_ce_loss(z, y, mask=mask)) == pytest.approx(
      log_loss(y[mask], _softmax_np(z[mask]), labels=range(C)), rel=1e-5)
  with pytest.raises(ValueError, match="class ids"):
    task.softmax_ce_loss(z, np.eye(C)[y][:, :3])


def test_token_ce_matches_numpy_and_mask_equals_dropping_tokens():
  z, y = _normal(1, 2, L, C), np.random.default_rng(2).integers(0, C, (2, L))
  mask = np.array([[1, 0, 1], [0, 1, 1]], bool)
  assert float(task.token_ce_loss(z, y)) == pytest.approx(
      token_ce_np(z, y), rel=1e-5)
  assert float(task.token_ce_loss(z, y, mask=mask)) == pytest.approx(
      token_ce_np(z, y, mask), rel=1e-5)
  assert float(task.token_ce_loss(z, y, mask=mask)) == pytest.approx(
      float(task.token_ce_loss(z[mask][None], y[mask][None])), rel=1e-6)


def test_token_ce_all_masked_is_zero_with_zero_gradient():
  z, y = _normal(1, 2, L, C), np.zeros((2, L), int)
  none = np.zeros((2, L), bool)
  f = lambda z_: task.token_ce_loss(z_, y, mask=none)
  assert float(f(jnp.asarray(z))) == 0.0
  np.testing.assert_array_equal(jax.grad(f)(jnp.asarray(z, jnp.float32)), 0.0)


# --- softmax KD ------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_softmax_kd_matches_numpy(temp):
  t, s = _normal(0, B, C), _normal(1, B, C)
  assert float(kd.softmax_kd_loss(t, s, temperature=temp)) == pytest.approx(
      softmax_kd_np(t, s, temp), rel=1e-5)
  t3, s3 = _normal(2, 2, L, C), _normal(3, 2, L, C)
  mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
  assert float(kd.softmax_kd_loss(t3, s3, temperature=temp, mask=mask)) == (
      pytest.approx(softmax_kd_np(t3, s3, temp, mask), rel=1e-5))


def test_softmax_kd_hand_cases():
  t = _normal(0, B, C)
  assert float(kd.softmax_kd_loss(t, t)) == 0.0
  # p = (½, ½), q = (¾, ¼): KL = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3).
  value = kd.softmax_kd_loss(np.zeros((1, 2)), np.log([[3.0, 1.0]]))
  assert float(value) == pytest.approx(0.5 * np.log(4 / 3), rel=1e-6)


def test_softmax_kd_mask_equals_dropping():
  t, s = _normal(0, B, C), _normal(1, B, C)
  mask = np.array([0, 1, 1, 0], bool)
  assert float(kd.softmax_kd_loss(t, s, temperature=2.0, mask=mask)) == (
      pytest.approx(float(kd.softmax_kd_loss(t[mask], s[mask],
                                             temperature=2.0)), rel=1e-6))


def test_softmax_kd_gradient_matches_fd():
  t = jnp.asarray(_normal(0, B, C), jnp.float32)
  _assert_fd(lambda s_: kd.softmax_kd_loss(t, s_, temperature=2.0),
             _normal(1, B, C))


# --- DKD -------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_numpy(alpha, beta, temp):
  t, s, y = _normal(0, B, C), _normal(1, B, C), _labels()
  got = kd.dkd_loss(t, s, y, alpha=alpha, beta=beta, temperature=temp)
  assert float(got) == pytest.approx(dkd_np(t, s, y, alpha, beta, temp),
                                     rel=1e-5)


def test_dkd_reduces_to_kd_and_vanishes_for_equal_logits():
  t, s, y = _normal(0, 1, C), _normal(1, 1, C), _labels()[:1]
  temp = 2.0
  p_target = _softmax_np(t[0] / temp)[y[0]]
  # KD = TCKD + (1 − p^t_y) NCKD (Zhao et al. 2022).
  assert float(kd.dkd_loss(t, s, y, alpha=1.0, beta=float(1 - p_target),
                           temperature=temp)) == pytest.approx(
      float(kd.softmax_kd_loss(t, s, temperature=temp)), rel=1e-5)
  assert float(kd.dkd_loss(t, s, y, temperature=4.0)) > 1e-3
  assert float(kd.dkd_loss(t, t, y, temperature=4.0)) == pytest.approx(
      0.0, abs=1e-6)


def test_dkd_mask_equals_dropping_and_gradient_matches_fd():
  t, s, y = _normal(0, B, C), _normal(1, B, C), _labels()
  mask = np.array([1, 0, 0, 1], bool)
  dkd = lambda *a, **k: float(kd.dkd_loss(*a, temperature=4.0, **k))
  assert dkd(t, s, y, mask=mask) == pytest.approx(
      dkd(t[mask], s[mask], y[mask]), rel=1e-6)
  tf = jnp.asarray(t, jnp.float32)
  _assert_fd(lambda s_: kd.dkd_loss(tf, s_, y, temperature=4.0), s)


# --- ULD -------------------------------------------------------------------


def test_uld_matches_numpy_with_different_vocabularies_and_masks():
  t, s = _normal(0, 2, L + 1, C), _normal(1, 2, L, VS)
  assert float(kd.uld_loss(t, s, temperature=2.0)) == pytest.approx(
      uld_np(t, s, 2.0), rel=1e-5)
  # Answer tokens sit at different positions: the k-th valid ones pair up.
  tmask = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], bool)
  smask = np.array([[1, 1, 0], [0, 1, 1]], bool)
  assert float(kd.uld_loss(t, s, teacher_mask=tmask, student_mask=smask)) == (
      pytest.approx(uld_np(t, s, 1.0, tmask, smask), rel=1e-5))
  assert float(kd.uld_loss(t[:, 0], s[:, 0])) == pytest.approx(
      uld_np(t[:, :1], s[:, :1]), rel=1e-5)


def test_uld_hand_cases_padding_and_permutations():
  # Sorted (.5, .3, .2) vs (.6, .4, 0): |.1| + |.1| + |.2| = .4.
  value = kd.uld_loss(np.log([[0.3, 0.5, 0.2]]), np.log([[0.4, 0.6]]))
  assert float(value) == pytest.approx(0.4, rel=1e-5)
  t, s = _normal(0, 2, L, C), _normal(1, 2, L, VS)
  # The same distribution on a larger vocabulary (extra tokens never drawn).
  padded = np.concatenate([t, np.full((2, L, 3), -1e4)], axis=-1)
  assert float(kd.uld_loss(t, padded)) == pytest.approx(0.0, abs=1e-6)
  base = float(kd.uld_loss(t, s))
  assert base > 1e-2
  rng = np.random.default_rng(4)
  assert float(kd.uld_loss(t[..., rng.permutation(C)],
                           s[..., rng.permutation(VS)])) == pytest.approx(
      base, rel=1e-6)


def test_uld_mask_equals_dropping_and_gradient_matches_fd():
  t, s = _normal(0, 1, L, C), _normal(1, 1, L, VS)
  mask = np.array([[1, 0, 1]], bool)
  assert float(kd.uld_loss(t, s, teacher_mask=mask, student_mask=mask)) == (
      pytest.approx(float(kd.uld_loss(t[mask][None], s[mask][None])),
                    rel=1e-6))
  tf = jnp.asarray(_normal(0, 2, L, C), jnp.float32)
  _assert_fd(lambda s_: kd.uld_loss(tf, s_), _normal(1, 2, L, VS), eps=1e-3)


# --- RKD -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(2))
def test_rkd_matches_numpy(seed):
  t, s = _normal(seed, 5, 4), _normal(seed + 10, 5, 3)
  assert float(relation.rkd_loss(t, s)) == pytest.approx(rkd_np(t, s),
                                                         rel=1e-5)
  assert float(relation.rkd_loss(t, 0.2 * s, distance_weight=0.5,
                                 angle_weight=1.5)) == pytest.approx(
      rkd_np(t, 0.2 * s, 0.5, 1.5), rel=1e-5)


def test_rkd_invariances_and_zero_for_similar_copies():
  t, s = _normal(0, 5, 3), _normal(1, 5, 3)
  rot = Rotation.random(random_state=0).as_matrix()
  distance = lambda t_, s_: float(relation.rkd_loss(t_, s_, angle_weight=0.0))
  base_d, base = distance(t, s), float(relation.rkd_loss(t, s))
  assert base_d > 1e-3 and base > base_d
  similar = lambda x: 3.0 * x @ rot.T + 7.0
  for t_, s_ in ((similar(t), s), (t, similar(s))):
    assert distance(t_, s_) == pytest.approx(base_d, rel=1e-5)
    assert float(relation.rkd_loss(t_, s_)) == pytest.approx(base, rel=1e-5)
  assert float(relation.rkd_loss(t, similar(t))) == pytest.approx(
      0.0, abs=1e-6)
  # An isometric embedding in a wider student space keeps every relation.
  iso = np.linalg.qr(_normal(2, 5, 3))[0].T  # [3, 5], orthonormal rows
  assert float(relation.rkd_loss(t, 0.5 * t @ iso)) == pytest.approx(
      0.0, abs=1e-6)


def test_rkd_gradient_matches_fd():
  t = jnp.asarray(_normal(0, 5, 4), jnp.float32)
  _assert_fd(lambda s_: relation.rkd_loss(t, s_), _normal(1, 5, 3))


# --- CRD and DIST (the baselines added as parts) ---------------------------


@pytest.mark.parametrize("temp", [0.07, 0.5])
def test_crd_matches_numpy(temp):
  t, s = _normal(0, 6, 4), _normal(1, 6, 4)
  got = contrastive.crd_loss(t, s, temperature=temp)
  assert float(got) == pytest.approx(crd_np(t, s, temp), rel=1e-5)


def test_crd_hand_cases_and_invariances():
  # Orthonormal pairs matched exactly: every positive scores 1/τ, every
  # negative 0, so each NLL is log(1 + (B − 1) e^{−1/τ}).
  eye = np.eye(4)
  value = float(contrastive.crd_loss(eye, 3.0 * eye, temperature=0.5))
  assert value == pytest.approx(np.log(1 + 3 * np.exp(-2.0)), rel=1e-6)
  # Scale of either side does not matter (unit embeddings); the same
  # rotation of both does not either; pairing the wrong records costs.
  t, s = _normal(0, 6, 4), _normal(1, 6, 4)
  crd = lambda t_, s_: float(contrastive.crd_loss(t_, s_, temperature=0.2))
  assert crd(5 * t, 0.1 * s) == pytest.approx(crd(t, s), rel=1e-5)
  rot = Rotation.random(random_state=1).as_matrix()
  t3, s3 = t[:, :3], s[:, :3]
  assert crd(t3 @ rot.T, s3 @ rot.T) == pytest.approx(crd(t3, s3), rel=1e-5)
  aligned = float(contrastive.crd_loss(t, t + 0.01 * s, temperature=0.2))
  shuffled = float(contrastive.crd_loss(np.roll(t, 1, 0), t + 0.01 * s,
                                        temperature=0.2))
  assert aligned < shuffled


def test_crd_gradient_matches_fd():
  t = jnp.asarray(_normal(0, 6, 4), jnp.float32)
  _assert_fd(lambda s_: contrastive.crd_loss(t, s_, temperature=0.5),
             _normal(1, 6, 4))


@pytest.mark.parametrize("beta,gamma,temp", [(1.0, 1.0, 1.0),
                                             (2.0, 0.5, 4.0)])
def test_dist_matches_numpy(beta, gamma, temp):
  t, s = _normal(0, B, C), _normal(1, B, C)
  got = kd.dist_loss(t, s, inter_weight=beta, intra_weight=gamma,
                     temperature=temp)
  assert float(got) == pytest.approx(dist_np(t, s, beta, gamma, temp),
                                     rel=1e-5)


def test_dist_hand_cases():
  # Pearson correlation is invariant to an affine map of the probabilities:
  # equal logits give 0; a logit shift per record changes nothing.
  t, s = _normal(0, B, C), _normal(1, B, C)
  dist = lambda t_, s_, **kw: float(kd.dist_loss(
      t_, s_, **{"inter_weight": 1.0, "intra_weight": 1.0,
                 "temperature": 1.0, **kw}))
  assert dist(t, t) == pytest.approx(0.0, abs=1e-6)
  assert dist(t, s + _normal(2, B, 1)) == pytest.approx(dist(t, s), rel=1e-5)
  # Each relation alone, and both at most 2 τ² (β + γ).
  inter = dist(t, s, intra_weight=0.0)
  intra = dist(t, s, inter_weight=0.0)
  assert dist(t, s) == pytest.approx(inter + intra, rel=1e-6)
  assert 0 < inter <= 2 and 0 < intra <= 2


def test_dist_gradient_matches_fd():
  t = jnp.asarray(_normal(0, B, C), jnp.float32)
  _assert_fd(lambda s_: kd.dist_loss(t, s_, inter_weight=1.0,
                                     intra_weight=1.0, temperature=1.0),
             _normal(1, B, C))


# --- every loss: bf16, large magnitude, one valid token / example ----------


def _tinybert(t, s, mask):
  w = jnp.asarray(_normal(7, 4, C, scale=0.5), jnp.float32)
  attn = lambda x: jnp.einsum("bnd,bmd->bnm", x, x)[:, None]
  return hints.tinybert_loss([t, 0.5 * t], [s, s + 1.0], [attn(t)] * 2,
                             [attn(s)] * 2, layer_map=[(0, 0), (1, 1)],
                             projection=lambda h: h @ w, mask=mask)


_Y = _labels()
# name: (loss(teacher, student, mask), teacher shape, student shape, mask shape)
CASES = {
    "softmax_ce": (lambda t, s, m: task.softmax_ce_loss(
        s, _Y, mask=m, label_smoothing=0.1), (B, C), (B, C), (B,)),
    "token_ce": (lambda t, s, m: task.token_ce_loss(
        s, np.zeros((2, L), int), mask=m), (2, L, C), (2, L, C), (2, L)),
    "softmax_kd": (lambda t, s, m: kd.softmax_kd_loss(
        t, s, temperature=2.0, mask=m), (2, L, C), (2, L, C), (2, L)),
    "dkd": (lambda t, s, m: kd.dkd_loss(t, s, _Y, mask=m, temperature=4.0),
            (B, C), (B, C), (B,)),
    "uld": (lambda t, s, m: kd.uld_loss(t, s, teacher_mask=m,
                                        student_mask=m),
            (2, L, C), (2, L, VS), (2, L)),
    "fitnet": (lambda t, s, m: hints.fitnet_loss(t, s, mask=m),
               (2, L, C), (2, L, C), (2, L)),
    "tinybert": (_tinybert, (2, L, C), (2, L, 4), (2, L)),
    "rkd": (lambda t, s, m: relation.rkd_loss(t, s), (B, C), (B, 4), None),
    "crd": (lambda t, s, m: contrastive.crd_loss(t, s, temperature=0.07),
            (B, C), (B, C), None),
    "dist": (lambda t, s, m: kd.dist_loss(t, s, inter_weight=1.0,
                                          intra_weight=1.0, temperature=1.0),
             (B, C), (B, C), None),
}
ROBUST = [(name, cond) for name in CASES
          for cond in ("bf16", "large", "one_valid")
          if not (cond == "one_valid" and CASES[name][3] is None)]


@pytest.mark.parametrize("name,cond", ROBUST)
def test_finite_float32_value_and_gradient(name, cond):
  f, t_shape, s_shape, m_shape = CASES[name]
  t, s = _normal(0, *t_shape), _normal(1, *s_shape)
  mask = None
  if cond == "large":
    t, s = 1e3 * t, 1e3 * s
  if cond == "one_valid":
    mask = np.zeros(m_shape, bool)
    mask[(0,) * len(m_shape)] = True
  dtype = jnp.bfloat16 if cond == "bf16" else jnp.float32
  t, s = jnp.asarray(t, dtype), jnp.asarray(s, dtype)
  value, grad = jax.value_and_grad(lambda s_: f(t, s_, mask))(s)
  assert value.dtype == jnp.float32 and np.isfinite(float(value))
  assert grad.dtype == dtype and np.all(np.isfinite(np.float32(grad)))
