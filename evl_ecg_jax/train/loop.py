"""fit(config, workdir): build -> restore -> train -> log -> checkpoint -> eval."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from evl_ecg_jax import checkpoint
from evl_ecg_jax import console
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import models
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.eval import evaluate as evaluate_lib
from evl_ecg_jax.train import build
from evl_ecg_jax.train import diagnostics
from evl_ecg_jax.train import trainer
from evl_ecg_jax.train import step as step_lib
from evl_ecg_jax.train import teacher_store


def write_json(workdir, name, payload):
  if jax.process_index() == 0:
    (epath.Path(workdir) / name).write_text(json.dumps(payload, indent=2))


def write_metrics(workdir, results, shown):
  """Writes <workdir>/metrics.json, logs it, and shows the `shown` keys
  on the terminal (the signal and VLM fits end the same way)."""
  write_json(workdir, "metrics.json", results)
  logging.info("Final metrics: %s", results)
  console.show(console.metrics_line(f"{workdir}/metrics.json", results,
                                    shown))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A fit's built parts, as plain data for `run_mode` (the signal fit
  here, the VLM fit in vlm/fit.py).

  Attributes:
    model, teacher, objective, task: what trains (teacher None: the task
      loss alone) and how the step reads and scores it (train/step.py).
    model_name: the trained model's name in metrics.json.
    shown: metric keys shown on the terminal at the end.
    load: () -> params {"model": ...} of the workdir (mode=evaluate).
    train: diagnostics Monitor or None -> trained params.
    evaluate: params -> {metric: value} on config.eval.splits.
  """
  model: Any
  teacher: Any
  objective: Any
  task: Any
  model_name: str
  shown: tuple
  load: Callable
  train: Callable
  evaluate: Callable


def run_mode(config, workdir, run, spec: RunSpec) -> dict:
  """What the signal and VLM fits share once their models are built.

  Writes config.json (config_evaluate.json for mode=evaluate, keeping the
  training run's as it was); gets params from `spec.load` (mode=evaluate)
  or `spec.train` (with the distillation diagnostics' Monitor when there
  is a teacher); evaluates them, completed with the diagnostics summary,
  the model, its size and the runner, into metrics.json.
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_json(workdir, "config.json" if config.mode != "evaluate"
             else "config_evaluate.json", config.to_dict())
  monitor = None
  if config.mode == "evaluate":
    params = spec.load()
  else:
    if spec.objective.alpha > 0 and config.eval.diagnostics:
      monitor = diagnostics.Monitor(run, model=spec.model,
                                    teacher=spec.teacher,
                                    objective=spec.objective, task=spec.task)
    params = spec.train(monitor)
  results = spec.evaluate(params)
  if monitor is not None:
    results.update(monitor.summary())
  results.update(model=spec.model_name, parallel=run.name,
                 num_params=int(sum(x.size for x in jax.tree.leaves(
                     params["model"]))))
  write_metrics(workdir, results, spec.shown)
  return results


def fit(config, workdir: str) -> dict:
  """Runs `config.mode` in `workdir`; returns the final eval metrics."""
  run, workdir = build.prepare(config, workdir)
  objective = build.objective(config)
  example = jnp.asarray(pipeline.example(config.data)["ecg"][None])
  foreign = build.foreign_teacher(config)
  model, teacher = build.build_models(config, objective, example.shape,
                                      foreign)
  if build.stored_teacher(config):
    try:
      teacher_store.check(config)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  predict = run.predictor(functools.partial(step_lib.predict_step,
                                            model=model))

  def evaluate(params):
    preds = {}
    results = evaluate_lib.evaluate(predict, params, config.data,
                                    config.eval.splits, preds)
    if jax.process_index() == 0:  # per-record scores, for reports and tests
      with (epath.Path(workdir) / "predictions.npz").open("wb") as f:
        np.savez(f, **{
            f"{split}/{name}": array for split, arrays in preds.items()
            for name, array in zip(("probs", "labels", "ids"), arrays)})
    return results

  return run_mode(config, workdir, run, RunSpec(
      model=model, teacher=teacher, objective=objective,
      task=step_lib.SignalTask,
      model_name=config[build.trained_block(config)].name,
      shown=tuple(f"{split}/macro_auc" for split in config.eval.splits),
      load=lambda: {"model": run.place_params(
          checkpoint.load_params(workdir, config.eval.checkpoint)["model"],
          models.abstract_variables(model, example.shape))},
      train=lambda monitor: _train(config, workdir, run, model, teacher,
                                   foreign, objective, example, predict,
                                   monitor),
      evaluate=evaluate))


def _train(config, workdir, run, model, teacher, foreign, objective,
           example, predict, monitor):
  """Trains `model`, distilled from `teacher` (or the `foreign` teacher's
  store) if there is one; returns params."""
  taps = objective.model_taps("teacher")
  feats = (None if foreign is None
           else build.teacher_feature_shapes(foreign, taps))
  init, step_fn, teacher_abstract = build.step_parts(
      config, model, teacher, objective, example, teacher_feats=feats)
  teacher_params = stored = None
  if teacher is not None:
    teacher_params = build.load_teacher_params(config, run, teacher_abstract)
  if build.stored_teacher(config):
    stored = teacher_store.build_or_load(config, foreign or (
        teacher_store.jax_source(config, teacher, teacher_params, taps)))
    stored = {k: v for k, v in stored.items() if k == "id" or k in {
        teacher_store.PREFIX + t for t in ("logits", *taps)}}
  return trainer.train(config, workdir, run, trainer.TrainSpec(
      init=init, step_fn=step_fn,
      batches=pipeline.train_iterator(
          config.data, process_index=jax.process_index(),
          process_count=jax.process_count(), per_record=stored),
      validate=lambda params: evaluate_lib.evaluate(
          predict, params, config.data, config.eval.splits[:1]),
      teacher_params=teacher_params, teacher_abstract=teacher_abstract,
      diagnose=monitor))
