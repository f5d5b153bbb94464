"""Is distillation doing anything? Diagnostics of an objective on one batch.

`diagnostics(...)` is a pure per-device function (run by the runner like a
prediction, `Runner.diagnoser`) that returns scalars, logged as `diag/<name>`
at every validation step and summarised in metrics.json (docs/evl.md):

  grad_share/<k>     ‖w_k ∇L_k‖ / ‖w_task ∇L_task‖, gradients into the
                     student's encoder (its classifier head excluded), w the
                     term's weight in Eq. 9 ((1 − α) for the task, α·λ_k)
  grad_cos/<k>       cos(∇L_k, ∇L_task)
  teacher_grad_cos/<k>  cos(∇L_k, ∇L_k with shuffled teacher features): 1 means
                     the term sends the same gradient whichever record the
                     teacher saw (a generic regulariser, not transfer)
  teacher_value_gap/<k>  (L_k(shuffled) − L_k) / |L_k|: > 0 when the matched
                     teacher fits the student better than another record's
  mhca/attention_entropy   mean entropy of the aligner's attention / log N
  mhca/aligned_token_cos   mean cosine between Ĥ_t's positions (1: one
                     vector repeated)
  mhca/aligned_record_share share of Ĥ_t's variance across the batch's
                     records (0: the same target for every record)
  ot/plan_perplexity  exp(entropy) of each teacher token's plan row (1: one
                     student token, M: spread over all of them)
  ot/diagonal_mass, ot/diagonal_mass_uniform   plan mass within ±2.5 student
                     tokens of the time diagonal, and that of a⊗b
  ot/sinkhorn_iterations  the iterations Sinkhorn took for the
                     teacher-to-student plan (mean over the batch)
  cka/<feature>, cka/<feature>_shuffled   linear CKA between student and
                     teacher features across the batch (logits, pooled
                     embeddings, time-aligned tokens), and with the teacher's
                     rows shuffled (its chance level)
Teacher outputs are shuffled as the `evl_shuffled` control shuffles them
(`Objective.teacher_shift`: logits, features and the teacher's
valid-token masks rolled by one record), so both read the same other
record. In a control run the objective already reads another record's
teacher, so its shuffled pass rolls by two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from evl_ecg_jax import losses
from evl_ecg_jax.models import layers
from evl_ecg_jax.train import step as step_lib

DIAGONAL_HALF_WIDTH = 2.5  # student tokens either side of the time diagonal


def _encoder_vector(tree):
  """One f32 vector of the student's params, its classifier head excluded."""
  leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if not layers.in_classifier_head(path)]
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def _cos(a, b):
  return jnp.vdot(a, b) / jnp.maximum(
      jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def term_gradients(params, batch, teacher_out, *, model, objective, task):
  """({term: value}, {term: encoder gradient vector}, the same two with the
  teacher's outputs shuffled (distillation terms only), student outputs);
  "ce" is the task term.

  One student forward (eval mode: no dropout, so matched and shuffled
  teachers see the same student) feeds both objectives; one backward per
  (term, teacher) pair pulls a one-hot cotangent through the same vjp. The
  backwards run in a lax.map: traced and compiled once, and run one after
  another (independent backward passes through the paper's implicit OT
  gradient, run concurrently by XLA:CPU in one program, were seen to
  deadlock with every thread idle).
  """
  args, kwargs = task.inputs(batch, "student")
  shuffled = dataclasses.replace(objective,
                                 teacher_shift=objective.teacher_shift + 1)
  heads = params.get("heads")

  def terms_of(model_params):
    out = model.apply({"params": model_params}, *args, train=False,
                      taps=objective.model_taps("student"), **kwargs)
    matched = task.loss(objective, heads, out, teacher_out, batch)[1]
    other = task.loss(shuffled, heads, out, teacher_out, batch)[1]
    other.pop("ce")  # reads no teacher: its gradient is matched["ce"]'s
    return (matched, other), out

  values, vjp, out = jax.vjp(terms_of, params["model"], has_aux=True)
  leaves, treedef = jax.tree.flatten(values)

  def gradient(one_hot):
    cotangent = [h * jnp.ones_like(v) for h, v in zip(one_hot, leaves)]
    return _encoder_vector(vjp(jax.tree.unflatten(treedef, cotangent))[0])

  rows = jax.lax.map(gradient, jnp.eye(len(leaves), dtype=jnp.float32))
  grads = jax.tree.unflatten(treedef, list(rows))
  return values[0], grads[0], values[1], grads[1], out


def linear_cka(x, y):
  """Linear CKA (Kornblith et al. 2019) of x [n, p] and y [n, q] (rows paired).

  0 when either side does not vary across rows (CKA is undefined there).
  """
  x, y = losses.f32(x, y)
  scale = jnp.sum(x * x) * jnp.sum(y * y)
  x = x - jnp.mean(x, axis=0)
  y = y - jnp.mean(y, axis=0)
  cross = jnp.sum((x.T @ y) ** 2)
  norms = jnp.sqrt(jnp.sum((x.T @ x) ** 2) * jnp.sum((y.T @ y) ** 2))
  varies = norms > 1e-10 * scale
  return jnp.where(varies, cross / jnp.where(varies, norms, 1.0), 0.0)


def _feature_pairs(student_out, teacher_out, objective):
  """{name: (student [n, p], teacher [n, q], rows per record)} across the
  batch: class logits, pooled features and time-aligned tokens. Token
  logits over two vocabularies (the VLM) are not paired."""
  (s_logits, s_feats), (t_logits, t_feats) = student_out, teacher_out
  pairs = {}
  if s_logits.ndim == 2 and t_logits.ndim == 2:
    pairs["logits"] = (s_logits, t_logits, 1)
  for kind in ("hidden", "embed"):
    s, t = (s_feats.get(objective.taps[f"student_{kind}"]),
            t_feats.get(objective.taps[f"teacher_{kind}"]))
    if s is None or t is None:
      continue
    if s.ndim == 3 and t.ndim == 3:  # tokens: time-aligned, then pooled
      pooled_t = losses.pool_tokens(t, s.shape[1])
      pairs["tokens"] = (s.reshape(-1, s.shape[-1]),
                         pooled_t.reshape(-1, t.shape[-1]), s.shape[1])
      s, t = jnp.mean(s, axis=1), jnp.mean(t, axis=1)
    pairs["pooled" if kind == "embed" else "hidden"] = (s, t, 1)
  return pairs


def _cka(student_out, teacher_out, objective):
  out = {}
  for name, (s, t, rows) in _feature_pairs(student_out, teacher_out,
                                           objective).items():
    out[f"cka/{name}"] = linear_cka(s, t)
    out[f"cka/{name}_shuffled"] = linear_cka(s, jnp.roll(t, rows, axis=0))
  return out


def _mhca(inside):
  attention, aligned = inside["attention"], losses.f32(inside["aligned"])
  keys = attention.shape[-1]
  entropy = -jnp.sum(jnp.where(attention > 0, attention * jnp.log(
      jnp.where(attention > 0, attention, 1.0)), 0.0), axis=-1)
  cos = losses.cosine_matrix(aligned)
  m = cos.shape[-1]
  off = (jnp.sum(cos, axis=(-2, -1)) - jnp.trace(cos, axis1=-2, axis2=-1)) / (
      m * (m - 1)) if m > 1 else jnp.ones(cos.shape[0])
  centred = aligned - jnp.mean(aligned, axis=(0, 1))
  across = aligned - jnp.mean(aligned, axis=0)
  return {"mhca/attention_entropy": jnp.mean(entropy) / jnp.log(keys),
          "mhca/aligned_token_cos": jnp.mean(off),
          "mhca/aligned_record_share": jnp.sum(across ** 2) / jnp.maximum(
              jnp.sum(centred ** 2), 1e-30)}


def _ot(plans):
  n, m = plans.shape[-2:]
  rows = jnp.sum(plans, axis=-1, keepdims=True)
  cond = plans / jnp.maximum(rows, 1e-30)
  entropy = -jnp.sum(jnp.where(cond > 0, cond * jnp.log(
      jnp.where(cond > 0, cond, 1.0)), 0.0), axis=-1)
  tau_t = (jnp.arange(n) + 0.5) / n
  tau_s = (jnp.arange(m) + 0.5) / m
  near = (jnp.abs(tau_t[:, None] - tau_s[None, :])
          <= DIAGONAL_HALF_WIDTH / m).astype(plans.dtype)
  return {"ot/plan_perplexity": jnp.mean(jnp.exp(entropy)),
          "ot/diagonal_mass": jnp.mean(jnp.sum(plans * near, axis=(-2, -1))),
          "ot/diagonal_mass_uniform": jnp.sum(near) / (n * m)}


def diagnostics(params, teacher_params, batch, *, model, teacher, objective,
                task=step_lib.SignalTask):
  """{name: scalar} for this device's batch (see the module docstring)."""
  t_out = step_lib.teacher_outputs(teacher, teacher_params, batch,
                                   objective.model_taps("teacher"), task)
  terms, grads, terms_sh, grads_sh, s_out = term_gradients(
      params, batch, t_out, model=model, objective=objective, task=task)
  weights = objective.term_weights
  task_grad = (1.0 - objective.alpha) * grads["ce"]
  out = {}
  for name in terms:
    if name == "ce":
      continue
    weighted = objective.alpha * weights[name] * grads[name]
    out[f"grad_share/{name}"] = jnp.linalg.norm(weighted) / jnp.maximum(
        jnp.linalg.norm(task_grad), 1e-30)
    out[f"grad_cos/{name}"] = _cos(grads[name], grads["ce"])
    out[f"teacher_grad_cos/{name}"] = _cos(grads[name], grads_sh[name])
    out[f"teacher_value_gap/{name}"] = (terms_sh[name] - terms[name]) / (
        jnp.maximum(jnp.abs(terms[name]), 1e-30))
  inside = objective.inspect(params.get("heads"), s_out, t_out,
                             task.masks(batch))
  if "attention" in inside:
    out.update(_mhca(inside))
  if "ot_plans" in inside:
    out.update(_ot(inside["ot_plans"]))
    out["ot/sinkhorn_iterations"] = jnp.mean(
        inside["ot_iterations"].astype(jnp.float32))
  out.update(_cka(s_out, t_out, objective))
  return out


class Monitor:
  """Runs `diagnostics` at validation steps and keeps their history.

  `monitor(params, teacher_params, host_batch)` -> {name: float} (the runner
  places the batch as for a train step and averages over its devices);
  `summary()` -> {"diag/<name>": last value, "diag_mean/<name>": mean over
  the run's validation steps} for metrics.json.
  """

  def __init__(self, run, *, model, teacher, objective,
               task=step_lib.SignalTask):
    self._fn = run.diagnoser(functools.partial(
        diagnostics, model=model, teacher=teacher, objective=objective,
        task=task))
    self.history: list[dict] = []

  def __call__(self, params, teacher_params, batch) -> dict:
    values = self._fn(params, teacher_params, batch)
    self.history.append(values)
    return values

  def summary(self) -> dict:
    if not self.history:
      return {}
    out = {f"diag/{k}": v for k, v in self.history[-1].items()}
    out.update({f"diag_mean/{k}": float(np.mean([h[k] for h in self.history]))
                for k in self.history[-1]})
    return out
