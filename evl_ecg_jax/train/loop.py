"""fit(config, workdir): build -> restore -> train -> log -> checkpoint -> eval."""

from __future__ import annotations

import functools
import json
import os

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from evl_ecg_jax import checkpoint
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import losses
from evl_ecg_jax import models
from evl_ecg_jax import parallel
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.eval import evaluate as evaluate_lib
from evl_ecg_jax.log import MetricWriter
from evl_ecg_jax.train import guards
from evl_ecg_jax.train import optim
from evl_ecg_jax.train import runner as runner_lib
from evl_ecg_jax.train import state as state_lib
from evl_ecg_jax.train import step as step_lib
from evl_ecg_jax.train import teacher_cache


def _trained_block(config) -> str:
  if config.mode == "train_teacher":
    return "teacher"
  if config.mode == "distill":
    return "student"
  return config.eval.model


def state_initializer(model, tx, config, example_ecg, objective=None,
                      teacher=None):
  """rng -> TrainState with logically partitioned (boxed) params.

  params = {"model": ...} plus {"heads": ...} when the objective has learned
  heads (MHCA aligner, OT projection), initialised on the shapes of the
  feature taps they read from the student and the teacher. The runner
  (train/runner.py) derives the shardings from the boxes, then unboxes.
  """
  t_feats = None
  if objective is not None and objective.heads is not None:
    t_feats = jax.eval_shape(lambda x: teacher.init_with_output(
        jax.random.PRNGKey(0), x, taps=objective.model_taps("teacher"))[0][1],
                             example_ecg)

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = {"model": model.init(params_rng, example_ecg)["params"]}
    if t_feats is not None:
      _, s_feats = model.apply({"params": nn.meta.unbox(params["model"])},
                               example_ecg,
                               taps=objective.model_taps("student"))
      params["heads"] = objective.init_heads(
          jax.random.fold_in(rng, 1), s_feats,
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t_feats))
    return state_lib.TrainState.create(params=params, tx=tx, rng=state_rng)
  return init


def load_teacher_params(config, run, teacher_abstract):
  """Frozen teacher params, cast to `config.teacher.frozen_param_dtype`
  (e.g. bfloat16 halves their memory; no optimizer state is ever created
  for them) and placed by the runner (replicated, or sharded like a
  trained model under parallel=spmd) from their boxed abstract variables."""
  dtype = jnp.dtype(config.teacher.frozen_param_dtype)
  params = jax.tree.map(lambda x: np.asarray(x, dtype),
                        checkpoint.load_params(config.teacher.init)["model"])
  return run.place_params(params, teacher_abstract)


def _abstract(model, input_shape, dtype=None):
  """Boxed abstract variables of `model`, params optionally cast."""
  abstract = models.abstract_variables(model, input_shape)
  if dtype is None:
    return abstract
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)


def _uses_teacher(config) -> bool:
  return config.mode == "distill" and config.loss.alpha > 0


def build_models(config, objective, input_shape):
  """(trained module, teacher module or None), checked against the config.

  Raises ConfigError naming the field: a bad model block, or a feature tap
  of `config.loss` that the model does not have (with the ones it has).
  """
  num_classes = len(config.data.class_names)
  built = {}
  for block in ("teacher", "student"):
    try:
      built[block] = models.get(config[block], num_classes, field=block)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  model = built[_trained_block(config)]
  teacher = built["teacher"] if _uses_teacher(config) else None
  if teacher is not None:
    for role, module in (("student", model), ("teacher", teacher)):
      names = models.tap_names(module, input_shape)
      for tap in objective.model_taps(role):
        if tap not in names:
          fields = [k for k, v in config.loss.items()
                    if k.startswith(role) and k.endswith("_tap") and v == tap]
          field = (f"{fields[0]}={tap!r}" if fields else
                   f"tinybert_layer_map={config.loss.tinybert_layer_map!r}")
          raise config_lib.ConfigError(
              f"config.loss.{field}: expected feature taps of the {role} "
              f"({config[role].name}): {names}; it has no {tap!r}.")
  return model, teacher


def _write_json(workdir, name, payload):
  if jax.process_index() == 0:
    (epath.Path(workdir) / name).write_text(json.dumps(payload, indent=2))


def resolve_workdir(workdir: str) -> str:
  """An absolute local path, or a URL (gs://...) unchanged."""
  if "://" in workdir:
    return workdir.rstrip("/")
  return os.path.abspath(os.path.expanduser(workdir))


def fit(config, workdir: str) -> dict:
  """Runs `config.mode` in `workdir`; returns the final eval metrics."""
  config_lib.check(config, num_devices=jax.device_count(),
                   model_names=models.MODELS,
                   has_checkpoint=checkpoint.has_checkpoint)
  try:
    run = runner_lib.make(config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  if run.name == "spmd":  # pmap's batch was checked against the devices
    config_lib.check_batch(config, run.batch_shards, jax.process_count())
  workdir = resolve_workdir(workdir)
  if config.mode == "evaluate" and not checkpoint.has_checkpoint(workdir):
    raise config_lib.ConfigError(
        f"--workdir={workdir}: mode=evaluate expected a workdir holding a "
        "checkpoint (of a train_teacher or distill run); none found.")
  # Every split the run reads must exist before anything is built or trained
  # (this also prepares the dataset on first use).
  for split in {"train", *config.eval.splits}:
    pipeline.source(config.data, split)
  # Only distillation has a teacher; a teacher itself trains on the task loss.
  objective = losses.make_objective(**dict(
      config.loss, alpha=config.loss.alpha if _uses_teacher(config) else 0.0))
  example = jnp.asarray(pipeline.example(config.data)["ecg"][None])
  model, teacher = build_models(config, objective, example.shape)
  if teacher is not None and config.teacher.cache_features:
    try:
      teacher_cache.check(config)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  # An evaluation keeps the training run's config.json as it was.
  _write_json(workdir, "config.json" if config.mode != "evaluate"
              else "config_evaluate.json", config.to_dict())
  block = _trained_block(config)
  predict = run.predictor(functools.partial(step_lib.predict_step,
                                            model=model))

  if config.mode == "evaluate":
    params = {"model": run.place_params(
        checkpoint.load_params(workdir)["model"],
        _abstract(model, example.shape))}
  else:
    params = _train(config, workdir, run, model, teacher, objective, example,
                    predict)

  preds = {}
  results = evaluate_lib.evaluate(predict, params, config.data,
                                  config.eval.splits, preds)
  if jax.process_index() == 0:  # per-record scores, for reports and tests
    with (epath.Path(workdir) / "predictions.npz").open("wb") as f:
      np.savez(f, **{
          f"{split}/{name}": array for split, arrays in preds.items()
          for name, array in zip(("probs", "labels", "ids"), arrays)})
  results["model"] = config[block].name
  results["num_params"] = int(sum(x.size for x in jax.tree.leaves(
      params["model"])))
  results["parallel"] = run.name
  _write_json(workdir, "metrics.json", results)
  logging.info("Final metrics: %s", results)
  return results


def _train(config, workdir, run, model, teacher, objective, example,
           predict):
  """Trains `model` (distilled from `teacher` if not None); returns params."""
  teacher_params = teacher_abstract = None
  if teacher is not None:
    teacher_abstract = _abstract(
        teacher, example.shape, jnp.dtype(config.teacher.frozen_param_dtype))
    teacher_params = load_teacher_params(config, run, teacher_abstract)
  tx = optim.make(config.optim, config.total_steps)
  init = state_initializer(model, tx, config, example, objective, teacher)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.ckpt.max_to_keep)
  cached = None
  if teacher is not None and config.teacher.cache_features:
    cached = teacher_cache.build_or_load(
        config, teacher, teacher_params, objective.model_taps("teacher"))
  data_iter = pipeline.train_iterator(
      config.data, process_index=jax.process_index(),
      process_count=jax.process_count(), per_record=cached)
  rng = jax.random.PRNGKey(config.seed)
  restored = ckpt.restore_latest(run.state_target(jax.eval_shape(init, rng)))
  if restored is None:
    state = run.init_state(init, rng)
  else:
    state, data_state = restored
    data_iter.set_state(data_state)
    state = run.place_state(state)
    logging.info("Resumed from step %d.", int(state.step))

  step_fn = functools.partial(
      step_lib.train_step, model=model, teacher=teacher, objective=objective,
      tx=tx, accum_steps=config.grad_accum_steps)
  p_train = run.train_step(step_fn, teacher_abstract)
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
        batch = next(data_iter)
        state, metrics = p_train(state, teacher_params, run.put_batch(
            {k: v for k, v in batch.items()
             if k in ("ecg", "labels", "label_mask")
             or k.startswith(teacher_cache.PREFIX)}))
        done = step + 1
        pending.append((done, metrics["finite"], batch["id"]))
        if done % config.log_every_steps == 0 or done == config.total_steps:
          guard.check_all(pending)
          metrics = {f"train/{k}": float(v) for k, v in metrics.items()
                     if k != "finite"}
          metrics["train/skipped_steps"] = guard.total
          metrics["train/learning_rate"] = float(schedule(step))  # this update
          writer.write(done, metrics)
          bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if done % config.eval_every_steps == 0 and done < config.total_steps:
          val = evaluate_lib.evaluate(predict, state.params, config.data,
                                      config.eval.splits[:1])
          writer.write(done, {f"eval/{k}": v for k, v in val.items()
                              if np.isscalar(v)})
        stop = preempted()
        if (done % config.ckpt_every_steps == 0 or done == config.total_steps
            or stop):
          guard.check_all(pending)  # never checkpoint an unchecked step
          ckpt.save(done, run.checkpointable(state), data_iter.get_state())
        if stop:
          logging.warning("Preemption notice (SIGTERM): saved step %d; "
                          "rerun the same command to resume.", done)
          raise guards.Preempted(done)
    finally:
      ckpt.close()  # waits for in-flight async saves
      writer.close()
  return state.params
