"""Config helpers: strict variant parsing and validation before anything compiles.

Config files live in `configs/` (big_vision style): `get_config(arg)` returns a
`ml_collections.ConfigDict`; `arg` is a comma-separated list of `key=value` or
bare `flag` variants, parsed strictly by `parse_arg` against the defaults the
config file declares.  `check` validates values and names the offending field.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from evl_ecg_jax import losses

MODES = ("train_teacher", "distill", "evaluate")
PARALLEL = ("pmap", "spmd", "shard_map")
# config.xla_optimization_level -> XLA's ExecutionOptions.EffortLevel value
# (jax's EffortLevel mirrors them; "" keeps XLA's default).
OPTIMIZATION_LEVELS = {"O0": 9, "O1": 19, "O2": 29, "O3": 39}


class ConfigError(ValueError):
  """A config field holds a value the library cannot run with."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"size=tiny,runlocal"` against typed defaults (big_vision parse_arg).

  Bare words set a bool default to True. Unknown variant names and values that
  do not convert to the default's type raise `ConfigError`.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"Unknown config variant {key!r} in {arg!r}; "
                        f"known variants: {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"Config variant {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"Config variant {key}={value!r}: expected a bool.")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ConfigError(f"Config variant {key}={value!r}: expected "
                          f"{type(default).__name__}.") from e
  return out


def override(config: ml_collections.ConfigDict, fields: dict):
  """Sets dotted fields ({"loss.alpha": 0.3}) in place; returns `config`.
  ConfigError for a field the config does not have (a typo is not a new
  field)."""
  for key, value in fields.items():
    block, _, field = key.rpartition(".")
    node = config
    for part in filter(None, block.split(".")):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) \
          else None
      if node is None:
        break
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ConfigError(f"config.{key}: no such field.")
    node[field] = value
  return config


def require(cond: bool, field: str, value: Any, expected: str) -> None:
  """Raises ConfigError 'config.<field>=<value>: expected <expected>.'."""
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: expected {expected}.")


def check(config: ml_collections.ConfigDict, *, num_devices: int,
          model_names=(), has_checkpoint=None) -> None:
  """Validates `config` before any model is built or step compiled.

  Args:
    config: the run config (see configs/default.py for every field).
    num_devices: global number of devices the batch is split over.
    model_names: registry of model names (`models.MODELS`) that
      `config.{teacher,student}.name` must be in; empty: not checked (the
      VLM configs name presets, checked by vlm/fit.py).
    has_checkpoint: callable(path) -> bool telling whether a workdir holds a
      checkpoint; used for `teacher.init` in distill mode.

  Raises:
    ConfigError naming the field, its value and what was expected.
  """
  require(config.mode in MODES, "mode", config.mode, f"one of {MODES}")
  for block in ("teacher", "student") if model_names else ():
    name = config[block].name
    require(name in model_names, f"{block}.name", name,
             f"a registered model {sorted(model_names)}")
  manual_dir = config.data.manual_dir
  require(not manual_dir or os.path.isdir(os.path.expanduser(manual_dir)),
           "data.manual_dir", manual_dir,
           "an existing folder holding the dataset in its official layout")
  require(config.parallel in PARALLEL, "parallel", config.parallel,
           f"one of {PARALLEL}")
  check_mesh(config.sharding, num_devices)
  require(not compiler_options(config) or config.parallel != "pmap",
           "xla_optimization_level", config.xla_optimization_level,
           "'' under parallel='pmap' (jax.pmap takes no compiler options; "
           "use parallel='spmd' or 'shard_map')")
  if config.parallel == "pmap":
    check_batch(config, num_devices, 1)
  else:
    require(not config.teacher.cache_features, "teacher.cache_features",
             config.teacher.cache_features, f"False with parallel="
             f"{config.parallel!r} (the "
             "cache is written by a pmapped, replicated teacher)")
    require(not config.teacher.get("onnx"), "teacher.onnx",
             config.teacher.get("onnx"), f"'' with parallel="
             f"{config.parallel!r} (a foreign teacher's store is read by the "
             "pmapped step; parallel='pmap')")
  require(0.0 <= config.loss.alpha <= 1.0, "loss.alpha", config.loss.alpha,
           "α in [0, 1]")
  check_cross_record(config)  # builds the objective: every term's checks
  _check_schedule(config)
  if config.mode == "distill" and config.loss.alpha > 0:
    if config.teacher.get("onnx"):
      _check_foreign(config.teacher)
    else:
      init = config.teacher.init
      require(bool(init), "teacher.init", init,
               "the workdir of a finished train_teacher run (α > 0 needs a "
               "teacher), or teacher.onnx and teacher.onnx_spec")
      require(has_checkpoint is None or has_checkpoint(init),
               "teacher.init", init, "a workdir holding a teacher checkpoint "
               "(written by --config.mode=train_teacher); none found at "
               f"{os.path.abspath(os.path.expanduser(init))}")


def _check_foreign(teacher) -> None:
  """teacher.onnx with its spec, and not beside a JAX teacher."""
  for field in ("onnx", "onnx_spec"):
    path = os.path.expanduser(teacher[field])
    require(bool(path) and os.path.isfile(path), f"teacher.{field}",
             teacher[field], "an existing file (an ONNX teacher needs the "
             ".onnx graph and its JSON spec, docs/teachers.md)")
  require(not teacher.init, "teacher.init", teacher.init,
           "'' with teacher.onnx set (one teacher: the JAX checkpoint or the "
           "ONNX graph)")


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  """Step counts, evaluation and checkpoint fields."""
  for field in ("total_steps", "log_every_steps", "eval_every_steps",
                "ckpt_every_steps", "max_bad_steps"):
    require(config[field] > 0, field, config[field], "a positive int")
  if config.mode != "evaluate":
    require(config.optim.warmup_steps < config.total_steps,
             "optim.warmup_steps", config.optim.warmup_steps,
             f"fewer than total_steps={config.total_steps}")
  require(config.eval.model in ("teacher", "student"), "eval.model",
           config.eval.model, "'teacher' or 'student'")
  require(config.eval.checkpoint in ("latest", "best"), "eval.checkpoint",
           config.eval.checkpoint, "'latest' or 'best'")
  require(config.ckpt.max_to_keep >= 1, "ckpt.max_to_keep",
           config.ckpt.max_to_keep, "an int >= 1")
  require(config.ckpt.best_mode in ("max", "min"), "ckpt.best_mode",
           config.ckpt.best_mode, "'max' or 'min'")
  metric = config.ckpt.best_metric
  require(not metric or (config.eval.splits and metric.startswith(
      config.eval.splits[0] + "/")), "ckpt.best_metric", metric,
           "'' or a metric of the split evaluated during training, "
           f"eval.splits[0]={tuple(config.eval.splits)[:1]}, e.g. "
           "'validation/macro_auc'")


def objective(config: ml_collections.ConfigDict, alpha=None):
  """The objective of config.loss at `alpha` (None: config.loss.alpha)
  (losses.build_objective: every term's checks, in one place); ConfigError
  naming the field."""
  loss = config.loss
  try:
    return losses.build_objective(
        alpha=loss.alpha if alpha is None else alpha, terms=loss.terms,
        taps=loss.taps, shuffle_teacher=loss.shuffle_teacher)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def cross_record_fields(config: ml_collections.ConfigDict) -> dict:
  """{field: records it needs in a (micro-)batch} of the config fields
  that make the objective compare or normalise across the records of a
  batch (docs/scale.md, "One objective on any number of devices"): each
  such term is computed over the global batch."""
  fields = {}
  if config.get("model_kind", "signal") == "vlm":
    fields["model_kind"] = 1  # the token CE: a mean over answer tokens
  elif config.data.label_fraction < 1:
    fields["data.label_fraction"] = 1  # the CE over labelled records
  for part in objective(config).parts:
    if part.records_needed():
      fields[f"loss.terms.{part.name}.{part.relates_by}"] = (
          part.records_needed())
  if config.loss.alpha > 0 and config.loss.shuffle_teacher:
    fields["loss.shuffle_teacher"] = 2  # a roll of one record is itself
  return fields


def check_cross_record(config: ml_collections.ConfigDict) -> None:
  """Cross-record terms can be exact: enough records in each (micro-)batch
  for relations (3: RKD's angles are triplets), contrasts and the shuffled
  teacher (2), and a stated meaning under gradient accumulation
  (`grad_accum_batch_terms`)."""
  fields, accum = cross_record_fields(config), config.grad_accum_steps
  mode = config.get("grad_accum_batch_terms", "refuse")
  require(mode in ("refuse", "micro_batch"), "grad_accum_batch_terms", mode,
          "'refuse' or 'micro_batch'")
  rows = config.data.batch_size // max(accum, 1)
  for needs in sorted(set(fields.values()), reverse=True):
    used = [f for f, n in fields.items() if n == needs]
    require(needs < 2 or rows >= needs, "data.batch_size",
            config.data.batch_size, f"at least {needs} records in each global "
            f"(micro-)batch for {used}: they relate the records of the "
            f"global batch; it has {rows} with grad_accum_steps={accum}")
  require(accum <= 1 or not fields or mode == "micro_batch",
          "grad_accum_batch_terms", mode,
          f"'micro_batch' to take the cross-record terms of {list(fields)} "
          f"over each of the grad_accum_steps={accum} micro-batches (another "
          "objective than the whole batch's), or grad_accum_steps=1")


def compiler_options(config: ml_collections.ConfigDict):
  """`jax.jit`'s compiler_options for config.xla_optimization_level (None
  for '' or an older config without the field: XLA's default); ConfigError
  naming the field for an unknown level."""
  level = config.get("xla_optimization_level", "")
  if not level:
    return None
  require(level in OPTIMIZATION_LEVELS, "xla_optimization_level", level,
          f"'' (XLA's default) or one of {sorted(OPTIMIZATION_LEVELS)}")
  return {"optimization_level": OPTIMIZATION_LEVELS[level]}


def mesh_sizes(axes, shape, num_devices: int) -> tuple[int, ...]:
  """The mesh shape with its -1 resolved, checked against the devices.

  One axis may be -1 (the remaining devices); the sizes must multiply to
  exactly `num_devices`. Errors name `config.sharding.mesh_shape`.
  """
  axes, shape = tuple(axes), tuple(shape)
  require(len(set(axes)) == len(axes) and len(axes) == len(shape),
           "sharding.mesh_shape", shape,
           f"one size per distinct mesh axis of {axes}")
  require(all(n == -1 or n >= 1 for n in shape) and shape.count(-1) <= 1,
           "sharding.mesh_shape", shape,
           "sizes >= 1, at most one -1 (the remaining devices)")
  fixed = 1
  for n in shape:
    fixed *= max(n, 1)
  require(num_devices % fixed == 0 if -1 in shape else fixed == num_devices,
           "sharding.mesh_shape", shape, f"sizes whose product is the "
           f"{num_devices} devices (or divides them, with one -1)")
  sizes = tuple(num_devices // fixed if n == -1 else n for n in shape)
  return sizes


def check_mesh(sharding: ml_collections.ConfigDict, num_devices: int) -> None:
  """`mesh_sizes`, and every mesh axis a logical rule names is a mesh axis."""
  mesh_sizes(sharding.mesh_axes, sharding.mesh_shape, num_devices)
  for logical, mesh_axes in sharding.rules:
    targets = (mesh_axes if isinstance(mesh_axes, (tuple, list))
               else (mesh_axes,))
    unknown = [a for a in targets if a is not None
               and a not in sharding.mesh_axes]
    require(not unknown, "sharding.rules", (logical, mesh_axes),
             f"mesh axes among {tuple(sharding.mesh_axes)} (unknown: "
             f"{unknown})")


def check_batch(config: ml_collections.ConfigDict, batch_shards: int,
                process_count: int) -> None:
  """Batch sizes against the devices the batch is split over.

  `batch_shards`: devices (pmap) or the mesh axes of the "batch" rule
  (spmd). Each of them gets a whole number of rows of every one of the
  `grad_accum_steps` micro-batches; each process reads a whole share.
  """
  accum = config.grad_accum_steps
  require(accum >= 1, "grad_accum_steps", accum, "an int >= 1")
  size = config.data.batch_size
  require(size > 0 and size % (batch_shards * accum) == 0,
           "data.batch_size", size,
           f"a positive multiple of the {batch_shards} batch shards "
           f"(devices, or the mesh axes of the 'batch' rule) x "
           f"grad_accum_steps={accum}")
  require(size % process_count == 0, "data.batch_size", size,
           f"a multiple of the {process_count} processes")
  size = config.data.eval_batch_size
  require(size > 0 and size % batch_shards == 0, "data.eval_batch_size",
           size, f"a positive multiple of the {batch_shards} batch shards "
           "(devices, or the mesh axes of the 'batch' rule)")
