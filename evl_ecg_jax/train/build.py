"""Builders from a config: the objective, the models, the state, the
frozen teacher, the runner and the per-device step.

Every entry point builds from here (the signal fit in train/loop.py, the
VLM fit, the ahead-of-time compile, the benchmarks); nothing here trains.
Errors name the config field (ConfigError).
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evl_ecg_jax import checkpoint
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import losses
from evl_ecg_jax import models
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.models import layers
from evl_ecg_jax.train import optim
from evl_ecg_jax.train import runner as runner_lib
from evl_ecg_jax.train import state as state_lib
from evl_ecg_jax.train import step as step_lib


def trained_block(config) -> str:
  if config.mode == "train_teacher":
    return "teacher"
  if config.mode == "distill":
    return "student"
  return config.eval.model


def uses_teacher(config) -> bool:
  return config.mode == "distill" and config.loss.alpha > 0


def stored_teacher(config) -> bool:
  """Whether the distillation reads its teacher's outputs from the store
  (train/teacher_store.py): cached by request, or a foreign teacher."""
  return uses_teacher(config) and bool(config.teacher.cache_features
                                       or config.teacher.onnx)


def objective(config) -> losses.Objective:
  """The run's objective from config.loss: only distillation has a teacher;
  a teacher itself (and a task-only student) trains on the task loss (α =
  0). ConfigError naming the field for a term setting that cannot work."""
  return config_lib.objective(
      config, alpha=config.loss.alpha if uses_teacher(config) else 0.0)


def foreign_teacher(config):
  """The store source (train/teacher_store.Source) of the ONNX teacher a
  distillation run names (config.teacher.onnx), else None; ConfigError
  naming the spec field for a spec or graph that does not fit."""
  if not (uses_teacher(config) and config.teacher.onnx):
    return None
  from evl_ecg_jax.teachers import onnx_teacher  # pylint: disable=g-import-not-at-top
  try:
    return onnx_teacher.source(config)
  except onnx_teacher.SpecError as e:
    raise config_lib.ConfigError(str(e)) from None


def teacher_feature_shapes(foreign, taps=None):
  """{tap: ShapeDtypeStruct [1, ...]} of a foreign teacher's stored
  features (of `taps` only, if given): what the learned heads are
  initialised on."""
  return {tap: jax.ShapeDtypeStruct((1, *shape), jnp.float32)
          for tap, shape in foreign.outputs.items()
          if tap != "logits" and (taps is None or tap in taps)}


def build_models(config, objective, input_shape, foreign=None):
  """(trained module, teacher module or None), checked against the config.

  `foreign`: the store source of an ONNX teacher (`foreign_teacher`): no
  teacher module is built, and the objective's teacher taps must be among
  its stored features. Raises ConfigError naming the field: a bad model
  block, or a feature tap of `config.loss` that the model (or the foreign
  teacher) does not have (with the ones it has).
  """
  num_classes = len(config.data.class_names)
  built = {}
  for block in ("teacher", "student"):
    try:
      built[block] = models.get(config[block], num_classes, field=block)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  model = built[trained_block(config)]
  teacher = built["teacher"] if uses_teacher(config) and not foreign else None
  shapes = {}
  if foreign is not None:
    shapes["teacher"] = {t: s.shape for t, s in
                         teacher_feature_shapes(foreign).items()}
  for role, module in (("student", model), ("teacher", teacher)):
    if module is None:
      continue
    block = trained_block(config) if role == "student" else "teacher"
    try:  # builds the model on the data's shape: patching, lead groups.
      shapes[role] = models.tap_shapes(module, input_shape)
    except (ValueError, TypeError) as e:
      raise config_lib.ConfigError(
          f"config.{block} ({config[block].name}) does not build on inputs "
          f"{tuple(input_shape)}: {e}") from None
  if uses_teacher(config):
    if foreign is not None:
      _check_foreign_taps(config, objective, shapes["teacher"])
    for role in ("student", "teacher"):
      for tap in objective.model_taps(role):
        _check_tap(config, role, tap, shapes[role])
    _check_widths(objective, shapes)
  return model, teacher


def _check_foreign_taps(config, objective, stored):
  """Each term's teacher taps must be features the ONNX teacher exports."""
  for part in objective.parts:
    taps = [objective.taps[f"teacher_{k}"] for k in part.kinds()]
    taps += list(part.layer_taps("teacher", objective.taps))
    missing = [t for t in taps if t not in stored]
    if missing:
      raise config_lib.ConfigError(
          f"config.loss.terms.{part.name} reads the teacher's tap "
          f"{missing[0]!r}; the ONNX teacher (config.teacher.onnx_spec="
          f"{config.teacher.onnx_spec}) exports the features "
          f"{sorted(stored)}. Add it to the spec's outputs (kind "
          f"'features', tap {missing[0]!r}) or turn the term off "
          f"(terms.{part.name}.weight=0).")


def _check_tap(config, role, tap, shapes):
  """A tap of `config.loss` must exist in the model it names."""
  if tap in shapes:
    return
  fields = [f"taps.{k}={v!r}" for k, v in config.loss.taps.items()
            if k.startswith(role) and v == tap]
  field = fields[0] if fields else (
      f"terms.tinybert.layer_map={config.loss.terms.tinybert.layer_map!r}")
  raise config_lib.ConfigError(
      f"config.loss.{field}: expected feature taps of the {role} "
      f"({config[role].name}): {sorted(shapes)}; it has no {tap!r}.")


def _check_widths(objective, shapes):
  """Token kinds (hidden, ot) are [B, N, D] taps; MHCA's width splits into
  its heads."""
  for part in objective.parts:
    for kind in set(part.kinds()) & {"hidden", "ot"}:
      for role in ("student", "teacher"):
        tap = objective.taps[f"{role}_{kind}"]
        if len(shapes[role][tap]) != 3:
          raise config_lib.ConfigError(
              f"config.loss.taps.{role}_{kind}={tap!r}: expected a token "
              f"tap [B, N, D] for terms.{part.name}; it has shape "
              f"{shapes[role][tap]}.")
  aligner = objective.part("mhca")
  if aligner is not None:
    width = (aligner.qkv_features
             or shapes["student"][objective.taps["student_hidden"]][-1])
    if width % aligner.num_heads:
      raise config_lib.ConfigError(
          f"config.loss.terms.mhca.num_heads={aligner.num_heads}: expected a "
          f"divisor of the aligner width {width} (terms.mhca.qkv_features, "
          "0: the student width).")


def state_initializer(model, tx, config, example, objective=None,
                      teacher=None, task=step_lib.SignalTask,
                      teacher_feats=None):
  """rng -> TrainState with logically partitioned (boxed) params.

  `example`: an ECG batch [1, T, L], or a batch dict that `task.inputs`
  reads (e.g. a VLM's image and tokens). params = {"model": ...} plus
  {"heads": ...} when the objective has learned heads (MHCA aligner, OT
  projection), initialised on the shapes of the feature taps they read from
  the student and the teacher. The runner (train/runner.py) derives the
  shardings from the boxes, then unboxes. `teacher_feats`: the teacher's
  feature shapes when there is no teacher module (a foreign teacher's
  store).
  """
  batch = example if isinstance(example, dict) else {"ecg": example}
  s_args, s_kwargs = task.inputs(batch, "student")
  t_feats = teacher_feats
  if (t_feats is None and objective is not None
      and objective.heads is not None):
    t_args, t_kwargs = task.inputs(batch, "teacher")
    t_feats = jax.eval_shape(lambda a: teacher.init_with_output(
        jax.random.PRNGKey(0), *a, taps=objective.model_taps("teacher"),
        **t_kwargs)[0][1], t_args)

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = {"model": model.init(params_rng, *s_args, **s_kwargs)["params"]}
    if t_feats is not None and objective.heads is not None:
      _, s_feats = model.apply({"params": nn.meta.unbox(params["model"])},
                               *s_args, taps=objective.model_taps("student"),
                               **s_kwargs)
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
  # A teacher trained with unrolled blocks loads into scanned ones (or back).
  params = layers.block_layout(
      params, nn.meta.unbox(teacher_abstract["params"]))
  return run.place_params(params, teacher_abstract)


def step_parts(config, model, teacher, objective, example,
               task=step_lib.SignalTask, teacher_feats=None):
  """(init, step_fn, teacher_abstract): the state initializer, the
  per-device step (`step_fn(state, teacher_params, batch, axis_name)`) and
  the frozen teacher's boxed abstract variables in
  `config.teacher.frozen_param_dtype` (None without a teacher), for an
  `example` batch (an ECG [1, T, L] or a dict `task.inputs` reads). The
  signal and VLM fits and the ahead-of-time compile (evl_ecg_jax/aot.py)
  all build from it. `teacher_feats`: see `state_initializer`."""
  teacher_abstract = None
  if teacher is not None:
    args, kwargs = task.inputs(
        example if isinstance(example, dict) else {"ecg": example}, "teacher")
    dtype = jnp.dtype(config.teacher.frozen_param_dtype)
    teacher_abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
        jax.eval_shape(functools.partial(teacher.init, **kwargs),
                       jax.random.PRNGKey(0), *args))
  tx = optim.make(config.optim, config.total_steps)
  init = state_initializer(model, tx, config, example, objective, teacher,
                           task, teacher_feats)
  step_fn = functools.partial(
      step_lib.train_step, model=model, teacher=teacher, objective=objective,
      tx=tx, accum_steps=config.grad_accum_steps, task=task)
  return init, step_fn, teacher_abstract


def resolve_workdir(workdir: str) -> str:
  """An absolute local path, or a URL (gs://...) unchanged."""
  if "://" in workdir:
    return workdir.rstrip("/")
  return os.path.abspath(os.path.expanduser(workdir))


def prepare(config, workdir: str, model_names=models.MODELS):
  """(runner, absolute workdir) once the config and the data check out.

  Validates the config, builds the runner (ConfigError naming the field),
  requires a checkpoint for mode=evaluate and opens every split the run
  reads (preparing the dataset on first use), before anything compiles.
  """
  config_lib.check(config, num_devices=jax.device_count(),
                   model_names=model_names,
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
  return run, workdir
