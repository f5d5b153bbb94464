"""The training loop every model family shares: restore -> steps -> log ->
validate -> checkpoint, preemption- and NaN-safe.

What is trained and on which data comes in as a `TrainSpec`, so ECG
classifiers (train/loop.py) and ECG vision-language models (vlm/fit.py)
run through the same checkpoints, guards and logs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import numpy as np
import tqdm

from evl_ecg_jax import checkpoint
from evl_ecg_jax import console
from evl_ecg_jax.log import MetricWriter
from evl_ecg_jax.train import guards
from evl_ecg_jax.train import optim

# Steps dispatched ahead of the host: each queued step holds its batch on
# the devices, and with logging every few hundred steps nothing else bounds
# the queue. Two fresh-clone test runs aborted inside XLA:CPU while 150
# pmapped steps over 8 fake devices were queued (the export tests' student,
# logged once at its end); a bounded queue keeps the device busy all the
# same (one step running, the next queued).
_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """What `train` runs: built by a fit from the config.

  Attributes:
    init: rng -> boxed TrainState.
    step_fn: (state, teacher_params, batch, axis_name) -> (state, metrics).
    batches: host batches (dicts holding "id"), a checkpointable iterator
      (`get_state`/`set_state`, e.g. grain's).
    validate: params -> {metric: float} on the validation split; its
      `config.ckpt.best_metric` ranks the checkpoints.
    host_keys: batch entries the step does not read (stay on the host).
    teacher_params, teacher_abstract: the frozen teacher (placed) and its
      boxed abstract variables, or None.
    diagnose: (params, teacher_params, model batch) -> {name: float}, run
      with `validate` on the step's batch and logged as "diag/<name>"
      (train/diagnostics.py), or None.
  """
  init: Callable
  step_fn: Callable
  batches: Iterator
  validate: Callable
  host_keys: tuple = ("id",)
  teacher_params: Any = None
  teacher_abstract: Any = None
  diagnose: Optional[Callable] = None

  def model_batch(self, batch) -> dict:
    return {k: v for k, v in batch.items() if k not in self.host_keys}


def _restore_or_init(ckpt, run, init, batches, rng):
  """(state, its target): the latest checkpoint (and the data iterator's
  state), or a new state; the target (run.state_target) carries the
  shardings the step is compiled for."""
  target = run.state_target(jax.eval_shape(init, rng))
  restored = ckpt.restore_latest(target)
  if restored is None:
    return run.init_state(init, rng, target), target
  state, data_state = restored
  batches.set_state(data_state)
  logging.info("Resumed from step %d.", int(state.step))
  return run.place_state(state), target


def _validate(validate, diagnose, params, teacher_params, batch, row, step,
              best_metric):
  """Validation metrics (returned, and in `row` as eval/*), and the
  distillation diagnostics on this step's batch (diag/*); one line on the
  terminal."""
  val = {k: float(v) for k, v in validate(params).items() if np.isscalar(v)}
  row.update({f"eval/{k}": v for k, v in val.items()})
  if diagnose is not None:
    row.update({f"diag/{k}": v for k, v in diagnose(
        params, teacher_params, batch).items()})
  console.show(console.metrics_line(f"step {step}", val, [best_metric]))
  return val


def _train_row(metrics, skipped, learning_rate) -> dict:
  """The train/* entries of a logged step (`learning_rate`: its update's)."""
  row = {f"train/{k}": float(v) for k, v in metrics.items() if k != "finite"}
  return dict(row, **{"train/skipped_steps": skipped,
                      "train/learning_rate": learning_rate})


def train(config, workdir: str, run, spec: TrainSpec):
  """Runs `config.total_steps` steps of `spec` with the runner `run`,
  resuming from `workdir` (checkpoints, metrics.jsonl); returns params."""
  batches, teacher_params = spec.batches, spec.teacher_params
  ckpt = checkpoint.Checkpointer(
      workdir, max_to_keep=config.ckpt.max_to_keep, config=config.to_dict(),
      best_metric=config.ckpt.best_metric, best_mode=config.ckpt.best_mode)
  state, target = _restore_or_init(ckpt, run, spec.init, batches,
                                   jax.random.PRNGKey(config.seed))
  p_train = run.train_step(spec.step_fn, target, spec.teacher_abstract)
  schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
  writer = MetricWriter(workdir)
  guard = guards.NonFiniteGuard(config.max_bad_steps)
  start = int(state.step)
  bar = tqdm.trange(start, config.total_steps, initial=start,
                    total=config.total_steps, desc=f"{config.mode}",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
  # Guard flags stay on device until the next log or checkpoint step, so
  # reading them never stalls the dispatch of the following steps.
  pending = []
  with guards.PreemptionNotice() as preempted:
    try:
      for step in bar:
        batch = next(batches)
        state, metrics = p_train(state, teacher_params,
                                 run.put_batch(spec.model_batch(batch)))
        done = step + 1
        pending.append((done, metrics["finite"], batch["id"]))
        if len(pending) > _IN_FLIGHT:  # bound the dispatch queue
          jax.block_until_ready(pending[-_IN_FLIGHT - 1][1])
        row = {}  # one metrics.jsonl line per step
        if done % config.log_every_steps == 0 or done == config.total_steps:
          guard.check_all(pending)
          row = _train_row(metrics, guard.total, float(schedule(step)))
          bar.set_postfix(loss=f"{row['train/loss']:.4f}")
        # Validation at eval steps (and the last one when checkpoints are
        # ranked by it); each such step is checkpointed with its metrics.
        val = None
        if done % config.eval_every_steps == 0 or (
            done == config.total_steps and config.ckpt.best_metric):
          val = _validate(spec.validate, spec.diagnose, state.params,
                          teacher_params, spec.model_batch(batch), row, done,
                          config.ckpt.best_metric or "validation/macro_auc")
        if row:
          writer.write(done, row)
        stop = preempted()
        if (done % config.ckpt_every_steps == 0 or done == config.total_steps
            or stop or val is not None):
          guard.check_all(pending)  # never checkpoint an unchecked step
          ckpt.save(done, run.checkpointable(state), batches.get_state(),
                    metrics=val)
        if stop:
          logging.warning("Preemption notice (SIGTERM): saved step %d; "
                          "rerun the same command to resume.", done)
          raise guards.Preempted(done)
    finally:
      ckpt.close()  # waits for in-flight async saves
      writer.close()
  return state.params
