r"""Fills the teacher-output store of a distillation run, then exits.

  python -m evl_ecg_jax.teachers \
      --config=configs/default.py:mode=distill,loss=kd \
      --config.teacher.onnx=teacher.onnx \
      --config.teacher.onnx_spec=teacher_spec.json

runs the ONNX teacher (onnxruntime, CPU, batched) over the training split
through its spec and writes the store beside the .onnx file (or at
config.teacher.store_dir); with --config.teacher.init=<workdir> and
--config.teacher.cache_features=True instead, the project's own teacher.
A distillation run with the same config then reads it. Prints where the
store is, what it holds, its size and the time the write took. Several
processes (--jax_distributed, with --coordinator_address,
--num_processes and --process_id off a TPU VM) each write their shards.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from evl_ecg_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config of the distillation run whose store to fill.",
    lock_config=True)
flags.mark_flags_as_required(["config"])


def _size(root) -> int:
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(root) for f in files)


def main(argv):
  del argv
  distributed.initialize()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from evl_ecg_jax import config as config_lib
  from evl_ecg_jax import console
  from evl_ecg_jax.data import pipeline
  from evl_ecg_jax.train import build
  from evl_ecg_jax.train import teacher_store
  # pylint: enable=g-import-not-at-top
  config = _CONFIG.value
  os.makedirs(teacher_store.root_of(config), exist_ok=True)
  console.quiet(teacher_store.root_of(config))  # library logs: log.txt there
  try:
    if not build.stored_teacher(config):
      raise config_lib.ConfigError(
          "the config has no stored teacher: expected mode=distill with "
          "loss.alpha > 0 and teacher.onnx (+ teacher.onnx_spec), or "
          "teacher.init with teacher.cache_features=True.")
    run, _ = build.prepare(config, os.getcwd())
    teacher_store.check(config)
    objective = build.objective(config)
    example = jnp.asarray(pipeline.example(config.data)["ecg"][None])
    foreign = build.foreign_teacher(config)
    model, teacher = build.build_models(config, objective, example.shape,
                                        foreign)
    source = foreign
    if source is None:
      _, _, abstract = build.step_parts(config, model, teacher, objective,
                                        example)
      source = teacher_store.jax_source(
          config, teacher, build.load_teacher_params(config, run, abstract),
          objective.model_taps("teacher"))
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"Config error: {e}")
  spec = teacher_store.manifest(config, source)
  start = time.perf_counter()
  rows = teacher_store.build_or_load(config, source, spec)
  seconds = time.perf_counter() - start
  root = teacher_store.location(config, spec)
  if jax.process_index() == 0:
    outputs = {k: list(v.shape) for k, v in rows.items()}
    print(json.dumps(dict(store=root, records=len(rows["id"]),
                          outputs=outputs, bytes=_size(root),
                          seconds=round(seconds, 2)), indent=1))


if __name__ == "__main__":
  app.run(main)
