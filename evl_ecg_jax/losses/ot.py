"""Optimal-transport token matching of EVL-ECG (L_ot), on ott-jax's Sinkhorn.

Paper form (the defaults): L_ot = Σ_ij P*_ij ‖t_i − s_j‖², with P* the
entropic plan between uniform measures on the valid teacher and student
tokens (EVL-ECG, OT matching).

Two departures, each an argument (docs/evl.md has the measurements):
- `time_weight` β adds a temporal term to the cost, C_ij = ‖t_i − s_j‖² +
  β (τ_i − τ_j)², τ the token's relative position in its sequence (fused /
  temporal OT). Teacher and student tokens cover the same 10 s in the same
  order; with the feature cost alone the plan ignores that and is close to
  the independent coupling.
- `debiased`: the Sinkhorn divergence S_ε(t, s) = OT_ε(t, s) − ½ OT_ε(t, t)
  − ½ OT_ε(s, s) (Genevay et al. 2018; Feydy et al. 2019), OT_ε the
  entropic cost ⟨P, C⟩ + ε KL(P ‖ a⊗b). ⟨P*, C⟩ is biased: it is lowest
  for a student whose tokens shrink towards their mean, whatever the
  teacher; S_ε is 0 for identical clouds and positive otherwise. Its
  gradient is exact with the plans held constant (envelope theorem), so
  no adjoint solve is needed.
`relative_epsilon` sets ε in units of the per-sequence standard deviation of
the cost (held constant in the gradient), so the plan's sharpness does not
depend on the feature scale or on β.

The gradient of the paper's ⟨P*, C⟩ is ours: ott-jax 0.6's `ImplicitDiff`
raises "linear solver returned non-finite output" on many inputs and its
unrolled mode (`implicit_diff=None`, 300 iterations) gave gradients off by
> 0.1 % on 35 of 40 random problems, median relative error 0.93 (measured,
see docs/losses.md). Here the implicit function theorem is applied to
Sinkhorn's first-order conditions and the (M+N)-dimensional adjoint system
is reduced by a Schur complement to a dense min(N, M)-sized symmetric
system (the constant vector is its known null direction), solved by
conjugate gradients (matmuls only; see `_cg_solve`). That is exact at
convergence and costs O(N·M·min(N, M)) per sequence.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration
from ott.solvers.linear import sinkhorn

from evl_ecg_jax.losses import _ops

PLAN_GRADIENTS = ("implicit", "stop")


class Solver(NamedTuple):
  """Sinkhorn's stopping rule and acceleration (hashable: a static arg).

  threshold: stop when the marginal error falls below it, checked every
    `inner_iterations` iterations (ott-jax's default 10; a batch of
    problems runs to its slowest one's count, so a finer check stops the
    easy problems' batch sooner).
  max_iterations: the cap.
  momentum: over-relaxation ω of the dual updates (ott-jax's Momentum;
    1 = plain Sinkhorn; 1 < ω < 2 converges to the same fixed point in
    fewer iterations).
  """
  threshold: float
  max_iterations: int
  inner_iterations: int
  momentum: float

  @classmethod
  def of(cls, threshold, max_iterations, inner_iterations, momentum):
    """From the loss's keyword values (Python numbers, hashable)."""
    return cls(float(threshold), int(max_iterations), int(inner_iterations),
               float(momentum))


def _sinkhorn(cost, a, b, epsilon, solver: Solver):
  """ott-jax's Sinkhorn output for the entropic problem (f, g, n_iters)."""
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  kwargs = {}
  if solver.momentum != 1.0:
    kwargs["momentum"] = acceleration.Momentum(value=solver.momentum)
  return sinkhorn.Sinkhorn(
      threshold=solver.threshold, max_iterations=solver.max_iterations,
      inner_iterations=solver.inner_iterations, implicit_diff=None,
      **kwargs)(linear_problem.LinearProblem(geom, a, b))


def _potentials(cost, a, b, epsilon, solver: Solver):
  """Sinkhorn dual potentials (f [N], g [M]) of the entropic problem."""
  out = _sinkhorn(cost, a, b, epsilon, solver)
  return out.f, out.g


def _plan(cost, f, g, a, b, epsilon):
  """P_ij = exp((f_i + g_j − C_ij) / ε), zero on rows/columns of zero mass."""
  valid = (a > 0)[:, None] & (b > 0)[None, :]
  logits = jnp.where(valid, (f[:, None] + g[None, :] - cost) / epsilon, -jnp.inf)
  return jnp.exp(logits)


def _cg_solve(matrix, rhs):
  """Least-norm solution of the Schur system of `_adjoints`, by conjugate
  gradients.

  The system is symmetric PSD; its null space is spanned by the ones
  vector on the rows with mass and the unit vectors of rows without. The
  residual is kept orthogonal to it (rounding would otherwise feed the
  null direction); Jacobi-preconditioned CG is then exact after n steps in
  exact arithmetic and runs a fixed 2n (matmuls only). LAPACK's batched
  eigh/Cholesky were avoided: their kernels wait on XLA:CPU's intra-op
  thread pool from inside it, and two of them running at once (two
  devices, or two backward passes in one program) deadlocked with every
  pool thread waiting.
  """
  n = rhs.shape[0]
  diag = jnp.diagonal(matrix)
  valid = (diag > 0).astype(rhs.dtype)
  inv_diag = valid / jnp.where(diag > 0, diag, 1.0)
  project = lambda r: valid * (r - jnp.sum(valid * r) / jnp.maximum(
      jnp.sum(valid), 1.0))
  rhs = project(rhs)
  z = inv_diag * rhs
  # Converged once the preconditioned residual is at rounding level.
  tol = (jnp.finfo(rhs.dtype).eps ** 2) * jnp.vdot(rhs, z)

  def body(_, carry):
    x, r, p, rz = carry
    ap = matrix @ p
    pap = jnp.vdot(p, ap)
    live = (rz > tol) & (pap > 0)
    step = jnp.where(live, rz / jnp.where(live, pap, 1.0), 0.0)
    x, r = x + step * p, project(r - step * ap)
    z = inv_diag * r
    rz_new = jnp.vdot(r, z)
    beta = jnp.where(live, rz_new / jnp.where(live, rz, 1.0), 0.0)
    return x, r, z + beta * p, jnp.where(live, rz_new, 0.0)

  carry = (jnp.zeros_like(rhs), rhs, z, jnp.vdot(rhs, z))
  return jax.lax.fori_loop(0, 2 * n, body, carry)[0]


def _adjoints(plan, cost):
  """Adjoint potentials (λ_f, λ_g) of L = ⟨P, C⟩ through Sinkhorn's fixed point.

  The optimality conditions F(f, g, C) = (P1 − a, Pᵀ1 − b) = 0 define (f, g)
  implicitly; with J = ∂F/∂(f, g) = (1/ε)[[diag(r), P], [Pᵀ, diag(c)]]
  (r, c: the plan's marginals), λ = J⁻¹ ∂L/∂(f, g) solves (multiplied by ε)
      r∘λ_f + P λ_g = u,  Pᵀ λ_f + c∘λ_g = v,  u = (P∘C)1,  v = (P∘C)ᵀ1.
  Eliminating λ_f leaves (diag(c) − Pᵀ diag(1/r) P) λ_g = v − Pᵀ(u/r), a
  PSD system whose null vector 1 is orthogonal to its right-hand side.
  Callers put the smaller token set on the g side.
  """
  pc = plan * cost
  u, v = jnp.sum(pc, axis=1), jnp.sum(pc, axis=0)
  r, c = jnp.sum(plan, axis=1), jnp.sum(plan, axis=0)
  inv_r = jnp.where(r > 0, 1.0 / jnp.where(r > 0, r, 1.0), 0.0)
  schur = jnp.diag(c) - plan.T @ (inv_r[:, None] * plan)
  lam_g = _cg_solve(schur, v - plan.T @ (u * inv_r))
  lam_f = (u - plan @ lam_g) * inv_r
  return lam_f, lam_g


def _cost_gradient(plan, cost, epsilon):
  """dL/dC for L = ⟨P*(C), C⟩: P ∘ (1 + (λ_f ⊕ λ_g − C) / ε)."""
  if plan.shape[1] <= plan.shape[0]:
    lam_f, lam_g = _adjoints(plan, cost)
  else:
    lam_g, lam_f = _adjoints(plan.T, cost.T)
  return plan * (1.0 + (lam_f[:, None] + lam_g[None, :] - cost) / epsilon)


def _cost(x, y, tx, ty, time_weight):
  """C_ij = ‖x_i − y_j‖² + β (τ_i − τ_j)² for one pair of sequences."""
  cost = _ops.squared_distances(x, y)
  if time_weight:
    cost = cost + time_weight * (tx[:, None] - ty[None, :]) ** 2
  return cost


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _transport_cost(x, y, a, b, tx, ty, epsilon, plan_gradient, time_weight,
                    solver):
  """⟨P*, C(x, y)⟩ for one pair of clouds; see `ot_loss`."""
  cost = _cost(x, y, tx, ty, time_weight)
  f, g = _potentials(cost, a, b, epsilon, solver)
  return jnp.sum(_plan(cost, f, g, a, b, epsilon) * cost)


def _transport_cost_fwd(x, y, a, b, tx, ty, epsilon, plan_gradient,
                        time_weight, solver):
  cost = _cost(x, y, tx, ty, time_weight)
  f, g = _potentials(cost, a, b, epsilon, solver)
  plan = _plan(cost, f, g, a, b, epsilon)
  return jnp.sum(plan * cost), (x, y, a, b, tx, ty, epsilon, plan)


def _transport_cost_bwd(plan_gradient, time_weight, solver, residuals,
                        g_out):
  del solver
  x, y, a, b, tx, ty, epsilon, plan = residuals
  cost, cost_vjp = jax.vjp(_ops.squared_distances, x, y)
  if plan_gradient == "stop":
    d_cost = plan  # envelope approximation: the plan is held constant.
  else:
    d_cost = _cost_gradient(plan, cost + (
        time_weight * (tx[:, None] - ty[None, :]) ** 2 if time_weight
        else 0.0), epsilon)
  dx, dy = cost_vjp(g_out * d_cost)
  zero = jnp.zeros_like
  return dx, dy, zero(a), zero(b), zero(tx), zero(ty), zero(epsilon)


_transport_cost.defvjp(_transport_cost_fwd, _transport_cost_bwd)


def _entropic_cost(x, y, a, b, tx, ty, epsilon, time_weight, solver):
  """OT_ε = ⟨P*, C⟩ + ε KL(P* ‖ a⊗b), differentiated with P* held constant.

  That derivative, dOT_ε/dC = P*, is exact at Sinkhorn's fixed point
  (envelope theorem: OT_ε is a minimum over P), so no adjoint is solved.
  """
  cost = _cost(x, y, tx, ty, time_weight)
  fixed = jax.lax.stop_gradient(cost)
  f, g = _potentials(fixed, a, b, epsilon, solver)
  plan = jax.lax.stop_gradient(_plan(fixed, f, g, a, b, epsilon))
  ab = a[:, None] * b[None, :]
  log_ratio = jnp.where(plan > 0, jnp.log(jnp.where(plan > 0, plan, 1.0))
                        - jnp.log(jnp.where(ab > 0, ab, 1.0)), 0.0)
  kl = jnp.sum(plan * log_ratio) - jnp.sum(plan) + jnp.sum(ab)
  return jnp.sum(plan * cost) + epsilon * kl


def uniform_marginal(mask, n, batch, dtype=jnp.float32):
  """[B, n] uniform weights over the valid (mask True) tokens of each row."""
  if mask is None:
    return jnp.full((batch, n), 1.0 / n, dtype)
  mask = jnp.asarray(mask, dtype)
  return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def token_positions(weights):
  """[B, n] relative position τ ∈ (0, 1) of each valid token, from `weights`.

  The k-th of n valid tokens sits at (k + ½)/n: teacher and student tokens
  covering the same signal get the same time axis whatever their counts.
  """
  valid = (weights > 0).astype(weights.dtype)
  count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1.0)
  return (jnp.cumsum(valid, axis=-1) - 0.5 * valid) / count * valid


def _epsilons(t, s, a, b, tau_t, tau_s, epsilon, relative, time_weight):
  """[B] ε per sequence: absolute, or ε × std of the valid costs."""
  if not relative:
    return jnp.full((t.shape[0],), epsilon, t.dtype)
  cost = jax.vmap(_cost, in_axes=(0, 0, 0, 0, None))(
      t, s, tau_t, tau_s, time_weight)
  pairs = ((a > 0)[:, :, None] & (b > 0)[:, None, :]).astype(t.dtype)
  count = jnp.maximum(jnp.sum(pairs, axis=(1, 2)), 1.0)
  mean = jnp.sum(cost * pairs, axis=(1, 2)) / count
  var = jnp.sum(pairs * (cost - mean[:, None, None]) ** 2, axis=(1, 2)) / count
  return jax.lax.stop_gradient(epsilon * jnp.sqrt(var + 1e-12))


def _check(t, s, epsilon, plan_gradient):
  if plan_gradient not in PLAN_GRADIENTS:
    raise ValueError(f"ot_loss: plan_gradient={plan_gradient!r}, expected one "
                     f"of {PLAN_GRADIENTS}.")
  if epsilon <= 0:
    raise ValueError(f"ot_loss: epsilon={epsilon!r}, expected > 0.")
  if t.ndim != 3 or s.ndim != 3 or t.shape[0] != s.shape[0] or (
      t.shape[-1] != s.shape[-1]):
    raise ValueError(f"ot_loss: teacher {t.shape} and student {s.shape} must "
                     "be [B, N, D] and [B, M, D] (project to a common width "
                     "first).")


def _prepared(teacher_tokens, student_tokens, teacher_mask, student_mask,
              epsilon, relative_epsilon, time_weight):
  """(t, s, a, b, τ_t, τ_s, ε [B]) with padded tokens zeroed."""
  t, s = _ops.f32(teacher_tokens, student_tokens)
  batch = t.shape[0]
  a = uniform_marginal(teacher_mask, t.shape[1], batch, t.dtype)
  b = uniform_marginal(student_mask, s.shape[1], batch, t.dtype)
  # Padded tokens carry no mass; zero them so garbage there cannot overflow C.
  t = jnp.where(a[..., None] > 0, t, 0.0)
  s = jnp.where(b[..., None] > 0, s, 0.0)
  tau_t, tau_s = token_positions(a), token_positions(b)
  eps = _epsilons(t, s, a, b, tau_t, tau_s, float(epsilon), relative_epsilon,
                  float(time_weight))
  return t, s, a, b, tau_t, tau_s, eps


# Both entry points compile as one program when called on their own
# (ott-jax's solver op by op took 8.5 s for a 2 × 9 × 6 float64 problem,
# jitted 3.6 s); inside a jitted step they are inlined. Every argument but
# the tokens and masks is a Python setting: static.
_SETTINGS = ("epsilon", "solver", "plan_gradient", "time_weight",
             "relative_epsilon", "debiased", "teacher_self_term")


@functools.partial(jax.jit, static_argnames=_SETTINGS)
def ot_loss(teacher_tokens, student_tokens, *, epsilon, solver: Solver,
            teacher_mask=None, student_mask=None, plan_gradient="implicit",
            time_weight=0.0, relative_epsilon=False, debiased=False,
            teacher_self_term=True):
  """OT matching loss, EVL-ECG: L_ot = Σ_ij P*_ij C_ij (or S_ε, `debiased`).

  P* is the entropic optimal plan between the uniform measures on the valid
  teacher tokens {t_i} and student tokens {s_j}, for the cost C_ij =
  ‖t_i − s_j‖² + β (τ_i − τ_j)² (β = `time_weight`, 0 in the paper):
      P* = argmin_{P ∈ U(a, b)} ⟨P, C⟩ − ε H(P),
  computed by ott-jax's Sinkhorn. The paper's loss is the bare transport
  cost ⟨P*, C⟩ (no entropy term), so it tends to the exact OT cost (ot.emd2)
  as ε → 0 and to the cost of the independent coupling as ε → ∞. With
  `debiased` it is the Sinkhorn divergence (module docstring).

  Args:
    teacher_tokens: [B, N, D] teacher tokens (already in the common space).
    student_tokens: [B, M, D] student tokens, same width D.
    epsilon: ε > 0: the *absolute* entropic regulariser, in units of C, or
      with `relative_epsilon` a multiple of the per-sequence standard
      deviation of C over valid pairs (held constant in the gradient). For
      unit-norm tokens C ∈ [0, 4] and an absolute ε = 0.05 gives a sharp plan.
    teacher_mask, student_mask: optional [B, N], [B, M] bool, True = valid.
    plan_gradient: "implicit" (default): the exact derivative of ⟨P*, C⟩,
      the plan's dependence on the tokens included (implicit function
      theorem at Sinkhorn's fixed point). "stop": the plan is held constant,
      dL/dC = P* (cheaper envelope approximation). Ignored with `debiased`,
      whose plan-constant gradient is exact.
    solver: Sinkhorn's stopping rule and acceleration (`Solver`; no
      default here: the OT part's, losses/terms.py, is the one).
    time_weight: β ≥ 0 of the temporal cost term; τ ∈ (0, 1) is the rank of
      the token among the valid ones of its sequence, (k + ½)/n.
    relative_epsilon: ε is relative to the cost's spread (see `epsilon`).
    debiased: return S_ε(t, s) = OT_ε(t, s) − ½ OT_ε(t, t) − ½ OT_ε(s, s).
    teacher_self_term: with `debiased`, False leaves out ½ OT_ε(t, t). It
      depends on the teacher alone, so the gradient is the same; the value
      is then S_ε + ½ OT_ε(t, t) (a per-batch constant, no longer ≥ 0), and
      the largest of the three Sinkhorn solves (N × N) is skipped.

  Returns:
    Scalar float32, mean over the batch.
  """
  _check(teacher_tokens, student_tokens, epsilon, plan_gradient)
  t, s, a, b, tau_t, tau_s, eps = _prepared(
      teacher_tokens, student_tokens, teacher_mask, student_mask, epsilon,
      relative_epsilon, time_weight)
  solve = dict(time_weight=float(time_weight), solver=solver)
  if not debiased:
    per_sequence = jax.vmap(
        _transport_cost, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None, None))(
            t, s, a, b, tau_t, tau_s, eps, plan_gradient,
            solve["time_weight"], solve["solver"])
    return jnp.mean(per_sequence)
  entropic = jax.vmap(functools.partial(_entropic_cost, **solve))
  cross = entropic(t, s, a, b, tau_t, tau_s, eps)
  self_s = entropic(s, s, b, b, tau_s, tau_s, eps)
  if not teacher_self_term:
    return jnp.mean(cross - 0.5 * self_s)
  self_t = jax.lax.stop_gradient(entropic(t, t, a, a, tau_t, tau_t, eps))
  return jnp.mean(cross - 0.5 * self_t - 0.5 * self_s)


@functools.partial(jax.jit,
                   static_argnames=_SETTINGS + ("with_iterations",))
def transport_plans(teacher_tokens, student_tokens, *, epsilon,
                    solver: Solver, teacher_mask=None, student_mask=None,
                    time_weight=0.0, relative_epsilon=False,
                    with_iterations=False, **unused):
  """The entropic plans P* [B, N, M] of `ot_loss` (teacher-to-student term).

  For inspection and plots (no gradient): rows are teacher tokens, columns
  student tokens; the same cost, ε and marginals as `ot_loss` with these
  arguments (its remaining ones, e.g. `debiased`, do not change the plan).
  `with_iterations` also returns the Sinkhorn iterations of each [B] (the
  cross term's solve; a multiple of `inner_iterations`).
  """
  del unused
  t, s, a, b, tau_t, tau_s, eps = _prepared(
      teacher_tokens, student_tokens, teacher_mask, student_mask, epsilon,
      relative_epsilon, time_weight)

  def plan(x, y, wa, wb, tx, ty, e):
    cost = _cost(x, y, tx, ty, float(time_weight))
    out = _sinkhorn(cost, wa, wb, e, solver)
    return _plan(cost, out.f, out.g, wa, wb, e), out.n_iters
  plans, iterations = jax.lax.stop_gradient(
      jax.vmap(plan)(t, s, a, b, tau_t, tau_s, eps))
  return (plans, iterations) if with_iterations else plans
