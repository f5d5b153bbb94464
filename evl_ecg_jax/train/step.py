"""Per-device train and predict steps: pure, no config reads, no I/O.

Written once with named-axis collectives over `axis_name`; `parallel.py`
runs them under `jax.pmap` or under `jit` + `jax.shard_map` on a mesh.
"""

from __future__ import annotations

import jax
import optax


def train_step(state, teacher_params, batch, *, model, teacher, objective,
               tx, axis_name="data"):
  """One optimiser step on this device's shard of the batch.

  Args:
    state: TrainState (replicated).
    teacher_params: frozen teacher params, or None when `teacher` is None.
    batch: {"ecg": [b, T, L], "labels": [b, C]} for this device, and
      optionally "label_mask" [b] (False: the task loss ignores the labels)
      and cached teacher outputs "teacher/logits", "teacher/<tap>" (then
      the teacher is not run).
    model: the Linen module being trained (params under params["model"];
      the learned heads of the feature losses, if any, under
      params["heads"]).
    teacher: frozen Linen teacher, or None (task loss only).
    objective: `losses.Objective`: (head_params, student_out, teacher_out,
      labels) -> (loss, terms); `objective.model_taps(role)` names the
      hidden states it reads from each model.
    tx: optax transformation.
    axis_name: the data-parallel axis of the wrapper.

  Returns:
    (new state, metrics averaged over `axis_name`).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  teacher_out = None
  if "teacher/logits" in batch:  # cached outputs (train/teacher_cache.py)
    teacher_out = (batch["teacher/logits"], {
        tap: batch[f"teacher/{tap}"] for tap in objective.model_taps(
            "teacher")})
  elif teacher is not None:
    teacher_out = jax.lax.stop_gradient(teacher.apply(
        {"params": teacher_params}, batch["ecg"],
        taps=objective.model_taps("teacher")))

  def loss_fn(params):
    out = model.apply({"params": params["model"]}, batch["ecg"], train=True,
                      rngs={"dropout": rng},
                      taps=objective.model_taps("student"))
    return objective(params.get("heads"), out, teacher_out, batch["labels"],
                     batch.get("label_mask"))

  # Differentiate per device, then average once. Without the cast,
  # shard_map's replication typing (check_vma) would already psum the
  # gradient of the replicated params, and the pmean below would leave an
  # n_devices-times too large sum (pmap does not do this; tested).
  local_params = jax.lax.pcast(state.params, axis_name, to="varying")
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      local_params)
  grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = jax.lax.pmean({"loss": loss, **terms}, axis_name)
  metrics["grad_norm"] = optax.global_norm(grads)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def predict_step(params, batch, *, model):
  """Per-class probabilities [b, C] for this device's shard (eval mode)."""
  logits, _ = model.apply({"params": params["model"]}, batch["ecg"], taps=())
  return jax.nn.sigmoid(logits)
