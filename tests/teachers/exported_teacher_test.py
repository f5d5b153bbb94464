"""The project's own trained teacher, exported to ONNX (evl_ecg_jax.export)
and read back as a foreign teacher through the teacher_spec.json the
export writes: its store equals the JAX teacher's within the float32
export's parity bound, and a student distilled from either store ends with
the same metrics to 3 decimals."""

import numpy as np
import pytest

from conftest import short_run
from evl_ecg_jax.export import builder
from evl_ecg_jax.export import parity
from evl_ecg_jax.train import loop
from evl_ecg_jax.train import teacher_store

TEACHER_STEPS, STUDENT_STEPS = 100, 40
KEYS = ("validation/macro_auc", "test/macro_auc")


def _config(tfds_dir, arg, steps):
  config = short_run(tfds_dir, arg + ",teacher=cnn1d", steps)
  config.optim.warmup_steps = 10
  config.eval.diagnostics = False
  return config


@pytest.fixture(scope="module")
def teacher(tfds_dir, tmp_path_factory):
  """(the teacher's workdir, its float32 ONNX graph, the graph's spec)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.fit(_config(tfds_dir, "mode=train_teacher", TEACHER_STEPS), workdir)
  out = str(tmp_path_factory.mktemp("export") / "teacher")
  report = builder.export(workdir, out, builder.Options(
      precisions=("float32",)))
  assert report["variants"]["float32"]["bound"]["ok"]
  return workdir, f"{out}/model_float32.onnx", f"{out}/teacher_spec.json"


def _distill(tfds_dir, teacher_fields, store_dir):
  config = _config(tfds_dir, "mode=distill,loss=kd", STUDENT_STEPS)
  config.teacher.store_dir = store_dir
  for name, value in teacher_fields.items():
    config.teacher[name] = value
  return config


def _rows(config, source):
  rows = teacher_store.build_or_load(config, source)
  return {k: np.stack([v[i] for i in range(len(v))]) for k, v in rows.items()}


def test_exported_teacher_gives_the_jax_store_and_the_same_student(
    tfds_dir, teacher, tmp_path):
  workdir, onnx_path, spec_path = teacher
  runs = {"jax": dict(init=workdir, cache_features=True),
          "onnx": dict(onnx=onnx_path, onnx_spec=spec_path)}
  configs = {name: _distill(tfds_dir, fields, str(tmp_path / name))
             for name, fields in runs.items()}
  metrics = {name: loop.fit(config, str(tmp_path / f"student_{name}"))
             for name, config in configs.items()}
  # The stores the two runs wrote (and read), record by record.
  from evl_ecg_jax.train import build  # pylint: disable=g-import-not-at-top
  jax_cfg = configs["jax"]
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  module = models.get(jax_cfg.teacher, len(jax_cfg.data.class_names))
  params = checkpoint.load_params(workdir)["model"]
  stores = {"jax": _rows(jax_cfg, teacher_store.jax_source(
                jax_cfg, module, params, ())),
            "onnx": _rows(configs["onnx"],
                          build.foreign_teacher(configs["onnx"]))}
  np.testing.assert_array_equal(stores["jax"]["id"], stores["onnx"]["id"])
  sigmoid = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))
  diff = np.abs(sigmoid(stores["jax"]["teacher/logits"])
                - sigmoid(stores["onnx"]["teacher/logits"]))
  assert diff.max() <= parity.BOUNDS["float32"][1], diff.max()
  # A teacher worth distilling: it is not a constant.
  assert np.std(stores["jax"]["teacher/logits"]) > 0.5
  ce = loop.fit(_config(tfds_dir, "mode=distill,loss=ce", STUDENT_STEPS),
                str(tmp_path / "student_ce"))
  for key in KEYS:
    assert abs(metrics["jax"][key] - metrics["onnx"][key]) < 5e-4, (
        key, metrics["jax"][key], metrics["onnx"][key])
  # The teacher moved the student: a comparison to 3 decimals that a
  # student without it would fail.
  assert max(abs(metrics["jax"][k] - ce[k]) for k in KEYS) > 5e-3
