"""Per-device train and predict steps: pure, no config reads, no I/O.

Written once with named-axis collectives over `axis_name`; `parallel.py`
runs them under `jax.pmap` or `jit` + `jax.shard_map` (per device, with
`axis_name`), or under plain `jit` on a sharded mesh (`axis_name=None`:
the step sees the global batch and XLA inserts the collectives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


class SignalTask:
  """ECG classification: models read batch["ecg"]; the task loss is the
  objective's multi-label BCE on batch["labels"] (masked by "label_mask").

  A task tells the step what a model reads from the batch (`inputs`) and
  how the objective scores the outputs (`loss`); vlm/task.py is the
  vision-language one.
  """

  @staticmethod
  def inputs(batch, role):
    del role
    return (batch["ecg"],), {}

  @staticmethod
  def loss(objective, head_params, student_out, teacher_out, batch,
           axis_name=None):
    """(loss, terms) of the global batch; `axis_name`: the step's data
    axis, None when this call sees every row."""
    return objective(head_params, student_out, teacher_out, batch["labels"],
                     batch.get("label_mask"), axis_name=axis_name)

  @staticmethod
  def masks(batch):
    """Valid-token masks of the objective's sequences (None: all valid)."""
    del batch
    return None


def teacher_outputs(teacher, teacher_params, batch, taps, task=SignalTask):
  """(logits, {tap: hidden}) of the frozen teacher, or None without one.

  Cached outputs in the batch ("teacher/logits", "teacher/<tap>", from
  train/teacher_store.py) are used instead of running the teacher.
  """
  if "teacher/logits" in batch:
    return batch["teacher/logits"], {tap: batch[f"teacher/{tap}"]
                                     for tap in taps}
  if teacher is None:
    return None
  args, kwargs = task.inputs(batch, "teacher")
  return jax.lax.stop_gradient(teacher.apply(
      {"params": teacher_params}, *args, taps=taps, **kwargs))


def micro_batches(x, accum_steps: int):
  """[b, ...] -> [accum_steps, b // accum_steps, ...], interleaved.

  Micro-batch i holds rows i, i + k, i + 2k, ...: on a mesh whose devices
  each hold a contiguous block of rows, every micro-batch stays spread over
  all of them (no resharding, no idle device).
  """
  b = x.shape[0]
  if b % accum_steps:
    raise ValueError(f"A batch of {b} rows does not split into "
                     f"grad_accum_steps={accum_steps} micro-batches.")
  return x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(
      0, 1)


def train_step(state, teacher_params, batch, *, model, teacher, objective,
               tx, axis_name="data", accum_steps=1, task=SignalTask):
  """One optimiser step on this device's shard of the batch.

  Args:
    state: TrainState (replicated, or sharded under jit).
    teacher_params: frozen teacher params, or None when `teacher` is None.
    batch: this device's {"ecg": [b, T, L], "labels": [b, C]}, optionally
      "label_mask" [b] and cached "teacher/logits", "teacher/<tap>"
      outputs (the teacher is then not run).
    model: the Linen module being trained (params["model"]; the learned
      heads of the distillation terms, if any, in params["heads"]).
    teacher: frozen Linen teacher, or None (task loss only).
    objective: `losses.Objective` (its `model_taps(role)`: what it reads).
    tx: optax transformation.
    axis_name: the wrapper's data axis, or None under jit on a mesh.
    task: what the models read from the batch and how the objective
      scores them (`SignalTask`, or vlm.task.VLMTask).
    accum_steps: micro-batches (`micro_batches`) run in a `lax.scan`, their
      gradients and metrics averaged in float32 before the one update: one
      big batch for a mean over examples; a cross-record term is each
      micro-batch's (config.grad_accum_batch_terms, docs/scale.md).

  Returns:
    (new state, metrics averaged over the batch and `axis_name`).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  params = state.params
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    # Differentiate per device, then average once. Without the cast,
    # shard_map's replication typing (check_vma) would already psum the
    # gradient of the replicated params, and the pmean below would leave an
    # n_devices-times too large sum (pmap does not do this; tested).
    params = jax.lax.pcast(params, axis_name, to="varying")

  def grads_and_metrics(micro, micro_rng):
    t_out = teacher_outputs(teacher, teacher_params, micro,
                            objective.model_taps("teacher"), task)
    args, kwargs = task.inputs(micro, "student")

    def loss_fn(p):
      out = model.apply({"params": p["model"]}, *args, train=True,
                        rngs={"dropout": micro_rng},
                        taps=objective.model_taps("student"), **kwargs)
      return task.loss(objective, p.get("heads"), out, t_out, micro,
                       axis_name=axis_name)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {"loss": loss, **terms}

  if accum_steps == 1:
    grads, metrics = grads_and_metrics(batch, rng)
  else:
    grads, metrics = _accumulated(grads_and_metrics, batch, rng, accum_steps,
                                  axis_name)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  return _guarded_update(state, grads, metrics, tx)


def _accumulated(grads_and_metrics, batch, rng, accum_steps, axis_name):
  """(grads, metrics) of `accum_steps` micro-batches run in a `lax.scan`,
  averaged in float32."""
  micro = jax.tree.map(lambda x: micro_batches(x, accum_steps), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grads_and_metrics, first, rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
  if axis_name is not None:
    zeros = jax.lax.pcast(zeros, axis_name, to="varying")

  def accumulate(total, xs):
    i, mb = xs
    out = grads_and_metrics(mb, jax.random.fold_in(rng, i))
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total,
                        out), None

  total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
  return jax.tree.map(lambda t, p: (t / accum_steps).astype(p.dtype), total,
                      shapes)


def _guarded_update(state, grads, metrics, tx):
  """The optimiser update, unless the loss or gradients are not finite:
  then params and optimizer state stay as they were (the step counter and
  the data move on; the host counts these steps, train/guards.py)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  metrics["finite"] = finite.astype(jnp.float32)
  return state.replace(step=state.step + 1,
                       params=keep(new_params, state.params),
                       opt_state=keep(opt_state, state.opt_state)), metrics


def predict_step(params, batch, *, model):
  """Per-class probabilities [b, C] for this device's shard (eval mode)."""
  logits, _ = model.apply({"params": params["model"]}, batch["ecg"], taps=())
  return jax.nn.sigmoid(logits)
