"""Optimal-transport token matching of EVL-ECG (L_ot), on ott-jax's Sinkhorn.

L_ot = Σ_ij P*_ij ‖t_i − s_j‖², with P* the entropic plan between uniform
measures on the valid teacher and student tokens (EVL-ECG, OT matching).

The plan comes from `ott.solvers.linear.sinkhorn.Sinkhorn`. Its gradient is
ours: ott-jax 0.6's `ImplicitDiff` raises "linear solver returned non-finite
output" on many inputs and its unrolled mode (`implicit_diff=None`, 300
iterations) gave gradients off by > 0.1 % on 35 of 40 random problems,
median relative error 0.93 (measured, see the README). Here the implicit function theorem is applied to Sinkhorn's
first-order conditions and the (M+N)-dimensional adjoint system is reduced by
a Schur complement to a dense min(N, M)-sized symmetric system, solved with an
eigendecomposition pseudo-inverse (the system has the constant vector as its
known null direction). That is exact at convergence, needs no iterative
solver and costs O(N·M·min(N, M)) per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from evl_ecg_jax.losses import _ops

PLAN_GRADIENTS = ("implicit", "stop")


def _potentials(cost, a, b, epsilon, threshold, max_iterations):
  """Sinkhorn dual potentials (f [N], g [M]) of the entropic problem."""
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  solver = sinkhorn.Sinkhorn(threshold=threshold,
                             max_iterations=max_iterations, implicit_diff=None)
  out = solver(linear_problem.LinearProblem(geom, a, b))
  return out.f, out.g


def _plan(cost, f, g, a, b, epsilon):
  """P_ij = exp((f_i + g_j − C_ij) / ε), zero on rows/columns of zero mass."""
  valid = (a > 0)[:, None] & (b > 0)[None, :]
  logits = jnp.where(valid, (f[:, None] + g[None, :] - cost) / epsilon, -jnp.inf)
  return jnp.exp(logits)


def _pinv_solve(matrix, rhs, rtol):
  """Least-norm solution of a symmetric PSD system (pseudo-inverse via eigh)."""
  evals, evecs = jnp.linalg.eigh(matrix)
  keep = evals > rtol * jnp.max(evals)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
  return evecs @ (inv * (evecs.T @ rhs))


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
  eps = jnp.finfo(plan.dtype).eps
  lam_g = _pinv_solve(schur, v - plan.T @ (u * inv_r),
                      rtol=plan.shape[1] * eps * 10)
  lam_f = (u - plan @ lam_g) * inv_r
  return lam_f, lam_g


def _cost_gradient(plan, cost, epsilon):
  """dL/dC for L = ⟨P*(C), C⟩: P ∘ (1 + (λ_f ⊕ λ_g − C) / ε)."""
  if plan.shape[1] <= plan.shape[0]:
    lam_f, lam_g = _adjoints(plan, cost)
  else:
    lam_g, lam_f = _adjoints(plan.T, cost.T)
  return plan * (1.0 + (lam_f[:, None] + lam_g[None, :] - cost) / epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _transport_cost(x, y, a, b, epsilon, plan_gradient, threshold,
                    max_iterations):
  """⟨P*, C(x, y)⟩ for one pair of clouds; see `ot_loss`."""
  cost = _ops.squared_distances(x, y)
  f, g = _potentials(cost, a, b, epsilon, threshold, max_iterations)
  return jnp.sum(_plan(cost, f, g, a, b, epsilon) * cost)


def _transport_cost_fwd(x, y, a, b, epsilon, plan_gradient, threshold,
                        max_iterations):
  cost = _ops.squared_distances(x, y)
  f, g = _potentials(cost, a, b, epsilon, threshold, max_iterations)
  plan = _plan(cost, f, g, a, b, epsilon)
  return jnp.sum(plan * cost), (x, y, a, b, plan)


def _transport_cost_bwd(epsilon, plan_gradient, threshold, max_iterations,
                        residuals, g_out):
  del threshold, max_iterations
  x, y, a, b, plan = residuals
  cost, cost_vjp = jax.vjp(_ops.squared_distances, x, y)
  if plan_gradient == "stop":
    d_cost = plan  # envelope approximation: the plan is held constant.
  else:
    d_cost = _cost_gradient(plan, cost, epsilon)
  dx, dy = cost_vjp(g_out * d_cost)
  return dx, dy, jnp.zeros_like(a), jnp.zeros_like(b)


_transport_cost.defvjp(_transport_cost_fwd, _transport_cost_bwd)


def uniform_marginal(mask, n, batch, dtype=jnp.float32):
  """[B, n] uniform weights over the valid (mask True) tokens of each row."""
  if mask is None:
    return jnp.full((batch, n), 1.0 / n, dtype)
  mask = jnp.asarray(mask, dtype)
  return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def ot_loss(teacher_tokens, student_tokens, *, epsilon, teacher_mask=None,
            student_mask=None, plan_gradient="implicit", threshold=1e-4,
            max_iterations=2000):
  """OT matching loss, EVL-ECG: L_ot = Σ_ij P*_ij ‖t_i − s_j‖².

  P* is the entropic optimal plan between the uniform measures on the valid
  teacher tokens {t_i} and student tokens {s_j}, for the squared-Euclidean
  cost C_ij = ‖t_i − s_j‖²:
      P* = argmin_{P ∈ U(a, b)} ⟨P, C⟩ − ε H(P),
  computed by ott-jax's Sinkhorn. The loss is the bare transport cost
  ⟨P*, C⟩ (no entropy term), so it tends to the exact OT cost (ot.emd2) as
  ε → 0 and to the cost of the independent coupling as ε → ∞.

  Args:
    teacher_tokens: [B, N, D] teacher tokens (already in the common space).
    student_tokens: [B, M, D] student tokens, same width D.
    epsilon: ε > 0, the *absolute* entropic regulariser, in units of C (no
      rescaling of the cost is done). Choose it relative to the typical
      squared distance: for unit-norm tokens C ∈ [0, 4] and ε = 0.05 gives
      a sharp plan.
    teacher_mask: optional [B, N] bool, True = valid token.
    student_mask: optional [B, M] bool, True = valid token.
    plan_gradient: "implicit" (default): the exact derivative of the loss,
      the plan's dependence on the tokens included (implicit function
      theorem at Sinkhorn's fixed point). "stop": the plan is held constant,
      dL/dC = P* (cheaper envelope approximation).
    threshold: Sinkhorn stops when the marginal error falls below this.
    max_iterations: Sinkhorn iteration cap.

  Returns:
    Scalar float32, mean over the batch.
  """
  if plan_gradient not in PLAN_GRADIENTS:
    raise ValueError(f"ot_loss: plan_gradient={plan_gradient!r}, expected one "
                     f"of {PLAN_GRADIENTS}.")
  if epsilon <= 0:
    raise ValueError(f"ot_loss: epsilon={epsilon!r}, expected > 0.")
  t, s = _ops.f32(teacher_tokens, student_tokens)
  if t.ndim != 3 or s.ndim != 3 or t.shape[0] != s.shape[0] or (
      t.shape[-1] != s.shape[-1]):
    raise ValueError(f"ot_loss: teacher {t.shape} and student {s.shape} must "
                     "be [B, N, D] and [B, M, D] (project to a common width "
                     "first).")
  batch = t.shape[0]
  a = uniform_marginal(teacher_mask, t.shape[1], batch, t.dtype)
  b = uniform_marginal(student_mask, s.shape[1], batch, t.dtype)
  # Padded tokens carry no mass; zero them so garbage there cannot overflow C.
  t = jnp.where(a[..., None] > 0, t, 0.0)
  s = jnp.where(b[..., None] > 0, s, 0.0)
  per_sequence = jax.vmap(
      _transport_cost, in_axes=(0, 0, 0, 0, None, None, None, None))(
          t, s, a, b, float(epsilon), plan_gradient, float(threshold),
          int(max_iterations))
  return jnp.mean(per_sequence)


def transport_plan(teacher_tokens, student_tokens, *, epsilon,
                   threshold=1e-4, max_iterations=2000):
  """The entropic plan P* [N, M] of `ot_loss` for one pair of sequences.

  For inspection and plots (no gradient): rows are teacher tokens, columns
  student tokens, uniform marginals, squared-Euclidean cost.
  """
  t, s = _ops.f32(teacher_tokens, student_tokens)
  cost = _ops.squared_distances(t, s)
  a = jnp.full((t.shape[0],), 1.0 / t.shape[0], t.dtype)
  b = jnp.full((s.shape[0],), 1.0 / s.shape[0], t.dtype)
  f, g = _potentials(cost, a, b, float(epsilon), float(threshold),
                     int(max_iterations))
  return jax.lax.stop_gradient(_plan(cost, f, g, a, b, float(epsilon)))
