"""ot_loss against POT (entropic and exact OT) and its properties.

POT is an independent implementation: its Sinkhorn plan for the same cost and
ε is the ott-jax plan, so Σ P·C must agree. Gradients are checked against
central finite differences in float64, where Sinkhorn can be converged far
enough for the comparison to be exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot as pot
import pytest

from evl_ecg_jax import losses


def _solver(threshold, max_iterations=2000, inner_iterations=10,
            momentum=1.0):
  return losses.ot.Solver.of(threshold, max_iterations, inner_iterations,
                             momentum)


TIGHT = dict(solver=_solver(1e-10, 100_000))  # float64 only
# The float32 solve of these tests (the pure functions take the solver's
# settings from their caller: the OT part's defaults are for training).
ot_loss = functools.partial(losses.ot_loss, solver=_solver(1e-4))
transport_plans = functools.partial(losses.ot.transport_plans,
                                    solver=_solver(1e-4))


def _clouds(seed, b=2, n=9, m=6, d=3, scale=1.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=(b, n, d)), scale * rng.normal(size=(b, m, d)))


def _pot_loss(t, s, eps, t_mask=None, s_mask=None, exact=False):
  """Mean over the batch of Σ P·C with POT's plan, on the valid tokens."""
  values = []
  for i in range(t.shape[0]):
    ti = t[i] if t_mask is None else t[i][t_mask[i]]
    si = s[i] if s_mask is None else s[i][s_mask[i]]
    cost = pot.dist(ti, si)  # squared Euclidean
    a, b = np.full(len(ti), 1 / len(ti)), np.full(len(si), 1 / len(si))
    if exact:
      values.append(pot.emd2(a, b, cost))
    else:
      plan = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log",
                          numItermax=100_000, stopThr=1e-13)
      values.append(np.sum(plan * cost))
  return float(np.mean(values))


@pytest.mark.parametrize(
    "eps", [pytest.param(0.1, marks=pytest.mark.slow), 0.3, 1.0])
def test_matches_pot_sinkhorn_plan_cost(eps):
  t, s = _clouds(0)
  with jax.enable_x64(True):
    value = float(ot_loss(t, s, epsilon=eps, **TIGHT))
  assert value == pytest.approx(_pot_loss(t, s, eps), rel=1e-7)
  # Default float32 path, default tolerance.
  value32 = float(ot_loss(t, s, epsilon=eps))
  assert value32 == pytest.approx(_pot_loss(t, s, eps), rel=2e-3)


def test_tends_to_exact_ot_as_epsilon_shrinks():
  t, s = _clouds(1, b=1, n=7, m=7)
  exact = _pot_loss(t, s, None, exact=True)
  gaps = []
  with jax.enable_x64(True):
    for eps in (0.5, 0.1, 0.02):
      gap = float(ot_loss(t, s, epsilon=eps, **TIGHT)) - exact
      assert gap >= -1e-9  # never below the exact optimum
      assert gap <= eps * np.log(7 * 7)  # entropic gap bound
      gaps.append(gap)
  assert gaps[0] > gaps[1] > gaps[2]
  assert gaps[-1] < 1e-2 * exact


def test_masks_equal_dropping_tokens():
  t, s = _clouds(2, b=2, n=8, m=6)
  t_mask = np.ones((2, 8), bool)
  t_mask[0, [1, 5]] = False
  t_mask[1, 7] = False
  s_mask = np.ones((2, 6), bool)
  s_mask[1, [0, 2]] = False
  t = np.where(t_mask[..., None], t, 1e6)  # padding garbage must not matter
  with jax.enable_x64(True):
    value = float(ot_loss(t, s, epsilon=0.2, teacher_mask=t_mask,
                                 student_mask=s_mask, **TIGHT))
    for i in range(2):
      dropped = float(ot_loss(t[i:i + 1][:, t_mask[i]],
                                     s[i:i + 1][:, s_mask[i]], epsilon=0.2,
                                     **TIGHT))
      assert dropped == pytest.approx(
          _pot_loss(t[i:i + 1], s[i:i + 1], 0.2, t_mask[i:i + 1],
                    s_mask[i:i + 1]), rel=1e-7)
  assert value == pytest.approx(_pot_loss(t, s, 0.2, t_mask, s_mask), rel=1e-7)


def _fd_check(shape, eps, seeds, mask_last=False):
  """Directional derivative of the default gradient vs central differences."""
  b, n, m, d = shape
  t_mask = None
  if mask_last:
    t_mask = np.ones((b, n), bool)
    t_mask[:, -1] = False
  f = jax.jit(functools.partial(losses.ot_loss, epsilon=eps,
                                teacher_mask=t_mask, **TIGHT))
  grad = jax.jit(jax.grad(f, argnums=(0, 1)))
  for seed in seeds:
    rng = np.random.default_rng(seed)
    t, s = rng.normal(size=(b, n, d)), rng.normal(size=(b, m, d))
    dt, ds = rng.normal(size=t.shape), rng.normal(size=s.shape)
    g_t, g_s = grad(t, s)
    assert np.all(np.isfinite(g_t)) and np.all(np.isfinite(g_s))
    h = 1e-5
    fd = (f(t + h * dt, s + h * ds) - f(t - h * dt, s - h * ds)) / (2 * h)
    analytic = np.vdot(g_t, dt) + np.vdot(g_s, ds)
    assert analytic == pytest.approx(float(fd), rel=1e-5, abs=1e-9), (
        shape, eps, seed)


# (B, N, M, D): batch of one, N > M, N < M, N = M, a single token.
SHAPES = [(1, 7, 4, 3), (2, 12, 5, 2), (2, 3, 9, 4), (1, 6, 6, 5),
          (1, 1, 5, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_matches_finite_differences(shape):
  with jax.enable_x64(True):
    _fd_check(shape, eps=0.3, seeds=range(4))
    if shape[1] > 2:
      _fd_check(shape, eps=0.1, seeds=range(4, 6), mask_last=True)


@pytest.mark.slow
def test_gradient_matches_finite_differences_many_random_problems():
  """40 random shapes; ε a random fraction (5–30 %) of the mean cost.

  The gradient is exact at Sinkhorn's fixed point. With ε ~1 % of the
  typical cost the plan is nearly a permutation and Sinkhorn does not
  converge in 1e5 iterations (seen at shape (3, 5, 5, 2), ε = 0.1 absolute:
  marginal error 6e-6, gradient off by 3e-4), so ε is set relative to each
  problem's cost scale, as unit-norm tokens do in the objective.
  """
  rng = np.random.default_rng(123)
  with jax.enable_x64(True):
    for trial in range(40):
      shape = tuple(int(x) for x in (rng.integers(1, 4), rng.integers(1, 20),
                                     rng.integers(1, 20), rng.integers(1, 8)))
      draw = np.random.default_rng(trial)  # the clouds _fd_check draws
      t = draw.normal(size=(shape[0], shape[1], shape[3]))
      s = draw.normal(size=(shape[0], shape[2], shape[3]))
      mean_cost = np.mean(np.sum((t[:, :, None] - s[:, None]) ** 2, -1))
      _fd_check(shape, eps=float(rng.choice([0.05, 0.1, 0.3]) * mean_cost),
                seeds=[trial], mask_last=bool(trial % 2) and shape[1] > 1)


def test_stop_gradient_holds_the_plan_constant():
  t, s = _clouds(3, b=1)
  with jax.enable_x64(True):
    g_t, g_s = jax.grad(lambda t_, s_: ot_loss(
        t_, s_, epsilon=0.2, plan_gradient="stop", **TIGHT), argnums=(0, 1))(
            t, s)
    plan = pot.sinkhorn(np.full(9, 1 / 9), np.full(6, 1 / 6),
                        pot.dist(t[0], s[0]), 0.2, method="sinkhorn_log",
                        numItermax=100_000, stopThr=1e-13)
    fixed = lambda t_, s_: jnp.sum(plan * jnp.sum(
        (t_[0][:, None] - s_[0][None]) ** 2, -1))
    e_t, e_s = jax.grad(fixed, argnums=(0, 1))(t, s)
    # The envelope gradient differs from the exact one (the plan moves).
    g_exact = jax.grad(lambda s_: ot_loss(t, s_, epsilon=0.2,
                                                 **TIGHT))(s)
  np.testing.assert_allclose(g_t, e_t, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g_s, e_s, rtol=1e-6, atol=1e-9)
  assert np.max(np.abs(g_exact - g_s)) > 1e-3


def test_permutation_invariance():
  t, s = _clouds(4)
  perm_t, perm_s = np.random.default_rng(0).permutation(9), np.arange(6)[::-1]
  f = lambda t_, s_: ot_loss(t_, s_, epsilon=0.2)
  g_t, g_s = jax.grad(f, argnums=(0, 1))(t, s)
  gp_t, gp_s = jax.grad(f, argnums=(0, 1))(t[:, perm_t], s[:, perm_s])
  assert float(f(t[:, perm_t], s[:, perm_s])) == pytest.approx(
      float(f(t, s)), rel=1e-5)
  np.testing.assert_allclose(gp_t, g_t[:, perm_t], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(gp_s, g_s[:, perm_s], rtol=1e-3, atol=1e-5)


@pytest.mark.slow  # 10^5 float64 iterations at ε = 0.1
def test_identical_clouds_give_the_entropic_floor_and_shifts_add_shift2():
  t, _ = _clouds(5, b=1, n=8)
  shift = np.array([0.3, -1.2, 0.5])
  with jax.enable_x64(True):
    floor = float(ot_loss(t, t, epsilon=0.1, **TIGHT))
    shifted = float(ot_loss(t, t + shift, epsilon=0.1, **TIGHT))
  independent = np.mean(pot.dist(t[0], t[0]))  # cost of the product plan
  assert floor == pytest.approx(_pot_loss(t, t, 0.1), rel=1e-7)
  assert 0 < floor < 0.05 * independent
  # A common shift δ only adds ‖δ‖² (the plan does not change).
  assert shifted == pytest.approx(floor + np.sum(shift**2), rel=1e-6)


def test_one_valid_teacher_token_is_the_mean_distance():
  t, s = _clouds(6, b=1, n=5, m=4)
  mask = np.zeros((1, 5), bool)
  mask[0, 2] = True
  f = lambda t_, s_: ot_loss(t_, s_, epsilon=0.1, teacher_mask=mask)
  expected = np.mean(np.sum((t[0, 2] - s[0]) ** 2, -1))
  assert float(f(t, s)) == pytest.approx(expected, rel=1e-5)
  grads = jax.grad(f, argnums=(0, 1))(t, s)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][0, [0, 1, 3, 4]], 0.0)


def test_bf16_and_large_inputs_stay_finite():
  t, s = _clouds(7)
  f = lambda t_, s_: ot_loss(t_, s_, epsilon=0.2)
  ref = float(f(t, s))
  tb, sb = jnp.asarray(t, jnp.bfloat16), jnp.asarray(s, jnp.bfloat16)
  value = f(tb, sb)
  assert value.dtype == jnp.float32 and value == pytest.approx(ref, rel=2e-2)
  g = jax.grad(f, argnums=(0, 1))(tb, sb)
  assert all(x.dtype == jnp.bfloat16 and np.all(np.isfinite(np.float32(x)))
             for x in g)
  # Far from the origin: the common centring keeps the value exact.
  assert float(f(t + 1e4, s + 1e4)) == pytest.approx(ref, rel=1e-3)
  # Large magnitude (costs ~1e6 at ε = 0.2): finite value and gradients.
  big = f(1e3 * t, 1e3 * s)
  g_big = jax.grad(f, argnums=(0, 1))(1e3 * t, 1e3 * s)
  assert np.isfinite(float(big)) and all(np.all(np.isfinite(x))
                                         for x in g_big)


def test_bad_arguments_are_named():
  t, s = _clouds(0)
  with pytest.raises(ValueError, match="common width"):
    ot_loss(t, s[..., :2], epsilon=0.1)
  with pytest.raises(ValueError, match="plan_gradient"):
    ot_loss(t, s, epsilon=0.1, plan_gradient="unrolled")
  with pytest.raises(ValueError, match="epsilon"):
    ot_loss(t, s, epsilon=0.0)


# --- Departures from the paper: temporal cost, relative ε, Sinkhorn
# divergence (docs/evl.md). References: POT's plans, numpy formulas.


def _positions(n):
  return (np.arange(n) + 0.5) / n


def _augment(x, beta):
  """[B, N, D] -> [B, N, D + 1]: ‖x̃_i − ỹ_j‖² = ‖x_i − y_j‖² + β (τ_i − τ_j)²."""
  tau = np.broadcast_to(_positions(x.shape[1])[None, :, None],
                        x.shape[:2] + (1,))
  return np.concatenate([x, np.sqrt(beta) * tau], axis=-1)


def _pot_entropic(x, y, eps):
  """OT_ε = ⟨P, C⟩ + ε KL(P ‖ a⊗b) with POT's plan (uniform weights)."""
  a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
  cost = pot.dist(x, y)
  plan = pot.sinkhorn(a, b, cost, eps, method="sinkhorn_log",
                      numItermax=100_000, stopThr=1e-13)
  ab = a[:, None] * b[None]
  kl = np.sum(plan * np.log(plan / ab)) - plan.sum() + ab.sum()
  return np.sum(plan * cost) + eps * kl


def _symmetric_entropic(x, eps, iterations=2000):
  """OT_ε(x, x) = 2⟨a, f⟩ with f the fixed point of the symmetric Sinkhorn
  update f ← ½ (f + softmin_ε(C − f)) (Feydy et al. 2019, numpy). Plain
  Sinkhorn (POT) oscillates on self-transport at small ε and needs 10⁵
  iterations (90 s) to meet 1e-13; the averaged update converges in
  hundreds."""
  cost = pot.dist(x, x)
  log_a = np.full(len(x), -np.log(len(x)))
  f = np.zeros(len(x))
  for _ in range(iterations):
    z = log_a[None, :] + (f[None, :] - cost) / eps
    zmax = z.max(axis=1, keepdims=True)
    soft = -eps * (zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1)))
    f = 0.5 * (f + soft)
  return 2 * float(np.exp(log_a) @ f)


def _pot_divergence(t, s, eps):
  """S_ε = OT_ε(t, s) − ½ OT_ε(t, t) − ½ OT_ε(s, s): POT for the cross
  term, the numpy symmetric solve for the self terms (checked against POT
  in the test below)."""
  return float(np.mean([
      _pot_entropic(t[i], s[i], eps) - 0.5 * _symmetric_entropic(t[i], eps)
      - 0.5 * _symmetric_entropic(s[i], eps) for i in range(len(t))]))


def test_symmetric_reference_matches_pot_where_pot_converges():
  x = _clouds(15)[0][0]
  assert _symmetric_entropic(x, 1.0) == pytest.approx(
      _pot_entropic(x, x, 1.0), rel=1e-9)


def test_time_weight_is_the_cost_of_time_augmented_tokens():
  t, s = _clouds(10)
  beta = 3.0
  with jax.enable_x64(True):
    value = float(ot_loss(t, s, epsilon=0.2, time_weight=beta,
                                 **TIGHT))
  assert value == pytest.approx(
      _pot_loss(_augment(t, beta), _augment(s, beta), 0.2), rel=1e-7)


def test_relative_epsilon_is_epsilon_times_the_cost_spread():
  t, s = _clouds(11, b=2)
  with jax.enable_x64(True):
    value = float(ot_loss(t, s, epsilon=0.3, relative_epsilon=True,
                                 **TIGHT))
    per_seq = [float(ot_loss(
        t[i:i + 1], s[i:i + 1], epsilon=0.3 * float(np.std(pot.dist(
            t[i], s[i]))), **TIGHT)) for i in range(2)]
  assert value == pytest.approx(np.mean(per_seq), rel=1e-7)
  # Scale-free: the plan of 10x larger tokens is the same, so the cost
  # grows exactly 100x.
  with jax.enable_x64(True):
    big = float(ot_loss(10 * t, 10 * s, epsilon=0.3,
                               relative_epsilon=True, **TIGHT))
  assert big == pytest.approx(100 * value, rel=1e-6)


@pytest.mark.parametrize("eps", [0.2, 1.0])
def test_debiased_matches_pot_sinkhorn_divergence(eps):
  t, s = _clouds(12)
  with jax.enable_x64(True):
    value = float(ot_loss(t, s, epsilon=eps, debiased=True, **TIGHT))
  assert value == pytest.approx(_pot_divergence(t, s, eps), rel=1e-6)
  value32 = float(ot_loss(t, s, epsilon=eps, debiased=True))
  assert value32 == pytest.approx(_pot_divergence(t, s, eps), rel=2e-3)
  # Without the teacher's self term: S_ε + ½ OT_ε(t, t), same gradient.
  with jax.enable_x64(True):
    partial = lambda s_: ot_loss(t, s_, epsilon=eps, debiased=True,
                                        teacher_self_term=False, **TIGHT)
    full = lambda s_: ot_loss(t, s_, epsilon=eps, debiased=True,
                                     **TIGHT)
    self_t = np.mean([_symmetric_entropic(x, eps) for x in t])
    assert float(partial(s)) == pytest.approx(
        _pot_divergence(t, s, eps) + 0.5 * self_t, rel=1e-6)
    np.testing.assert_allclose(jax.grad(partial)(s), jax.grad(full)(s),
                               rtol=1e-9, atol=1e-12)


def test_debiased_is_zero_for_equal_clouds_and_removes_the_shrink_bias():
  t, s = _clouds(13, b=1, n=8, m=8)
  # ε as large as the cost's spread (where the paper's ε sat, issue #19).
  kw = dict(epsilon=1.0, relative_epsilon=True, **TIGHT)
  with jax.enable_x64(True):
    div = lambda x, y: float(ot_loss(x, y, debiased=True, **kw))
    biased = lambda x, y: float(ot_loss(x, y, **kw))
    assert abs(div(t, t)) < 1e-10 and div(t, s) > 0
    # Shrinking a cloud towards its mean lowers ⟨P*, C⟩ against a
    # reference cloud with the same mean, but moves it away in S_ε.
    centre = s.mean(axis=1, keepdims=True)
    shrunk = centre + 0.2 * (s - centre)
    same_mean = t - t.mean(axis=1, keepdims=True) + centre
    assert biased(same_mean, shrunk) < biased(same_mean, s)
    assert div(same_mean, shrunk) > div(same_mean, s)


def test_debiased_gradient_matches_finite_differences():
  rng = np.random.default_rng(14)
  t, s = rng.normal(size=(2, 7, 3)), rng.normal(size=(2, 5, 3))
  mask = np.ones((2, 7), bool)
  mask[1, -2:] = False
  with jax.enable_x64(True):
    f = jax.jit(lambda s_: ot_loss(
        t, s_, epsilon=0.3, teacher_mask=mask, debiased=True,
        time_weight=2.0, relative_epsilon=True, **TIGHT))
    g = jax.grad(f)(s)
    d = rng.normal(size=s.shape)
    h = 1e-5
  # ε is held constant in the gradient (relative_epsilon): the finite
  # difference sees it move, so compare at fixed ε too.
  with jax.enable_x64(True):
    eps = [0.3 * float(np.std(pot.dist(t[i][mask[i]], s[i]) + 2.0 * (
        _positions(mask[i].sum())[:, None] - _positions(5)[None]) ** 2))
           for i in range(2)]
    fixed = lambda s_: jnp.mean(jnp.stack([ot_loss(
        t[i:i + 1, mask[i]], s_[i:i + 1], epsilon=eps[i], debiased=True,
        time_weight=2.0, **TIGHT) for i in range(2)]))
    fd_fixed = (fixed(s + h * d) - fixed(s - h * d)) / (2 * h)
  assert float(fd_fixed) == pytest.approx(float(np.vdot(g, d)), rel=1e-6)


def test_transport_plans_follow_the_time_axis():
  rng = np.random.default_rng(15)
  t, s = rng.normal(size=(1, 20, 4)), rng.normal(size=(1, 10, 4))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  plans = {beta: np.asarray(transport_plans(
      unit(t), unit(s), epsilon=0.05, time_weight=beta,
      solver=_solver(1e-6)))[0]
           for beta in (0.0, 50.0)}
  near = np.abs(_positions(20)[:, None] - _positions(10)[None]) <= 0.1
  for plan in plans.values():
    np.testing.assert_allclose(plan.sum(1), 1 / 20, atol=1e-4)
    np.testing.assert_allclose(plan.sum(0), 1 / 10, atol=1e-4)
  assert plans[50.0][near].sum() > 0.9 > plans[0.0][near].sum()


def test_momentum_and_error_checks_keep_the_fixed_point_in_fewer_steps():
  """Over-relaxed Sinkhorn (ω = 1.3) and a finer error check converge to
  the same plan as plain Sinkhorn (POT's value, float64), in fewer
  iterations; the iterations are the count the solver reports."""
  t, s = _clouds(16, b=3, n=12, m=8)
  with jax.enable_x64(True):
    for solver in (_solver(1e-10, 100_000),
                   _solver(1e-10, 100_000, inner_iterations=1, momentum=1.3)):
      value = float(ot_loss(t, s, epsilon=0.3, solver=solver))
      assert value == pytest.approx(_pot_loss(t, s, 0.3), rel=1e-7), solver
  kw = dict(epsilon=0.3, with_iterations=True)
  plain, n_plain = transport_plans(t, s, **kw)
  fast, n_fast = transport_plans(
      t, s, solver=_solver(1e-4, inner_iterations=1, momentum=1.3), **kw)
  assert np.all(np.asarray(n_plain) % 10 == 0)  # checked every 10
  assert np.mean(n_fast) < np.mean(n_plain)
  np.testing.assert_allclose(fast, plain, atol=1e-4 / 8)
