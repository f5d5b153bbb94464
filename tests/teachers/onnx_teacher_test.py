"""Foreign (ONNX) teachers: the spec's preprocessing and class mapping
against numpy written here, a hand-built graph's store against its weights,
bad specs and mismatching graphs refused by field, and distillation from
the store with no JAX teacher (terms needing taps it lacks refused)."""

import json
import os

import numpy as np
import onnx
from onnx import helper
from onnx import TensorProto
import pytest
import scipy.signal

from configs import default
from evl_ecg_jax import config as config_lib
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.models import layers
from evl_ecg_jax.teachers import onnx_teacher
from evl_ecg_jax.teachers import spec as spec_lib
from evl_ecg_jax.train import loop
from evl_ecg_jax.train import teacher_store

CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
LEADS = ["V2", "I", "aVF"]  # a subset, out of the dataset's order
SAMPLES = 800  # of the synthetic records' 1000 at 100 Hz: a centre crop
RNG = np.random.default_rng(0)
W = RNG.normal(size=(len(LEADS), 7)).astype(np.float32)  # 7 graph classes


def _spec(**changes):
  spec = {
      "input": {"name": "x", "layout": "batch,leads,samples",
                "sampling_rate_hz": 100, "samples": SAMPLES, "leads": LEADS,
                "units": "uV"},
      "outputs": {"scores": {"kind": "logits"},
                  "mean": {"kind": "features", "tap": "pooled"}},
      "classes": [f"s{i}" for i in range(7)],
      "class_map": {"NORM": ["s0"], "MI": ["s1", "s2"], "STTC": ["s3"],
                    "CD": ["s4", "s5", "s6"], "HYP": ["s6"]},
      "combine": "noisy_or"}
  for dotted, value in changes.items():
    *path, last = dotted.split(".")
    target = spec
    for key in path:
      target = target[key]
    if value is None:
      del target[last]
    else:
      target[last] = value
  return spec


def _graph(samples=SAMPLES, batch="batch"):
  """x [B, leads, samples] -> mean over time [B, leads] ("mean") and
  mean @ W ("scores")."""
  nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["mean"],
                            keepdims=0),
           helper.make_node("MatMul", ["mean", "w"], ["scores"])]
  graph = helper.make_graph(
      nodes, "linear_teacher",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                     [batch, len(LEADS), samples])],
      [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                     [batch, W.shape[1]]),
       helper.make_tensor_value_info("mean", TensorProto.FLOAT,
                                     [batch, len(LEADS)])],
      initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
                   onnx.numpy_helper.from_array(W, "w")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
  model.ir_version = 10
  onnx.checker.check_model(model)
  return model


@pytest.fixture
def files(tmp_path):
  def write(spec=None, model=None):
    onnx.save(model or _graph(), str(tmp_path / "teacher.onnx"))
    with open(tmp_path / "spec.json", "w", encoding="utf-8") as f:
      json.dump(spec or _spec(), f)
    return str(tmp_path / "teacher.onnx"), str(tmp_path / "spec.json")
  return write


def _config(tfds_dir, onnx_path, spec_path, arg="mode=distill,loss=kd"):
  config = default.get_config(arg + ",runlocal")
  config.data.data_dir = tfds_dir
  config.teacher.onnx, config.teacher.onnx_spec = onnx_path, spec_path
  return config


def _logit(p):
  return np.log(p) - np.log1p(-p)


def test_adapt_reorders_converts_resamples_and_crops():
  t = np.arange(1000) / 500.0
  ecg = np.stack([np.sin(2 * np.pi * (k + 1) * t) * (k + 1)
                  for k in range(12)], axis=1).astype(np.float32)
  spec = spec_lib.load(_write_tmp(_spec(**{
      "input.sampling_rate_hz": 400, "input.samples": 900,
      "input.crop": "start"})), CLASSES)
  x = spec_lib.adapt(ecg, 500, spec)
  assert x.shape == (3, 900)  # leads first, 800 samples at 400 Hz padded
  t400 = np.arange(800) / 400.0
  for row, lead in zip(x, LEADS):
    k = layers.LEADS.index(lead) + 1
    want = 1000 * k * np.sin(2 * np.pi * k * t400)  # µV of the mV record
    # Away from the edges the polyphase resampler is exact to < 0.5 %.
    np.testing.assert_allclose(row[50:750], want[50:750], atol=5 * k)
    np.testing.assert_array_equal(row[800:], 0)  # zero-padded at the end
  np.testing.assert_allclose(x[:, :800], 1000 * scipy.signal.resample_poly(
      ecg[:, [layers.LEADS.index(lead) for lead in LEADS]], 4, 5,
      axis=0).T, rtol=1e-5, atol=1e-2)
  centred = spec_lib.fit_length(np.arange(10.0)[:, None], 4, "center")
  np.testing.assert_array_equal(centred[:, 0], [3, 4, 5, 6])


def test_class_maps_against_numpy():
  v = RNG.normal(size=(6, 7)) * 3
  p = 1 / (1 + np.exp(-v))
  sig = spec_lib.load(_write_tmp(_spec()), CLASSES)
  want = np.stack([p[:, 0], 1 - (1 - p[:, 1]) * (1 - p[:, 2]), p[:, 3],
                   1 - np.prod(1 - p[:, 4:7], axis=1), p[:, 6]], axis=1)
  np.testing.assert_allclose(spec_lib.to_logits(v, sig), _logit(want),
                             rtol=1e-5, atol=1e-5)
  # One logit per class is kept bit for bit; "max" takes the largest.
  one = spec_lib.load(_write_tmp(_spec(class_map={
      c: [f"s{i}"] for i, c in enumerate(CLASSES)})), CLASSES)
  np.testing.assert_array_equal(spec_lib.to_logits(v, one),
                                v[:, :5].astype(np.float32))
  mx = spec_lib.load(_write_tmp(_spec(combine="max")), CLASSES)
  np.testing.assert_allclose(spec_lib.to_logits(v, mx)[:, 3],
                             _logit(p[:, 4:7].max(axis=1)), rtol=1e-5)
  soft = spec_lib.load(_write_tmp(_spec(**{
      "outputs.scores.activation": "softmax", "combine": "sum"})), CLASSES)
  q = np.exp(v) / np.exp(v).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(spec_lib.to_logits(v, soft)[:, 1],
                             _logit(q[:, 1] + q[:, 2]), rtol=1e-4)


_BAD = [
    ({"input.units": "mmHg"}, "input.units"),
    ({"input.leads": ["I", "V7"]}, r"input.leads\[1\]"),
    ({"input.samples": 0}, "input.samples"),
    ({"input.layout": "leads,samples"}, "input.layout"),
    ({"input.gain": 2}, "input.gain: unknown field"),
    ({"class_map.HYP": None}, "class_map.HYP: missing"),
    ({"class_map.CD": ["s4", "s9"]}, "class_map.CD: 's9' is not in classes"),
    ({"class_map.AFIB": ["s1"]}, "class_map.AFIB: not a dataset class"),
    ({"outputs.scores.kind": "scores"}, "outputs.scores.kind"),
    ({"outputs.mean.kind": "logits"}, "outputs: expected exactly one"),
    ({"combine": "sum"}, "combine: 'sum'; with sigmoid outputs"),
    ({"classes": ["s0", "s0"]}, "classes"),
]


@pytest.mark.parametrize("changes,field", _BAD)
def test_bad_specs_name_the_field(changes, field):
  path = _write_tmp(_spec(**changes))
  with pytest.raises(spec_lib.SpecError, match=f"{path}: {field}"):
    spec_lib.load(path, CLASSES)


def _write_tmp(spec, _count=[0]):  # pylint: disable=dangerous-default-value
  import tempfile  # pylint: disable=g-import-not-at-top
  _count[0] += 1
  path = os.path.join(tempfile.gettempdir(),
                      f"evl_spec_{os.getpid()}_{_count[0]}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return path


def test_store_of_a_graph_equals_its_weights(tfds_dir, files, tmp_path):
  config = _config(tfds_dir, *files())
  config.teacher.store_dir = str(tmp_path / "store")
  source = onnx_teacher.source(config, batch_size=5)  # batches of 5, not 16
  rows = teacher_store.build_or_load(config, source)
  records = pipeline.split_records(config.data, "train")
  np.testing.assert_array_equal(np.asarray([rows["id"][i] for i in range(
      len(rows["id"]))]), records["id"])
  x = records["ecg"][:, 100:900][:, :, [layers.LEADS.index(l) for l in LEADS]]
  mean = 1000.0 * x.astype(np.float64).mean(axis=1)  # µV, over the crop
  p = 1 / (1 + np.exp(-(mean @ W)))
  want = np.stack([p[:, 0], 1 - (1 - p[:, 1]) * (1 - p[:, 2]), p[:, 3],
                   1 - np.prod(1 - p[:, 4:7], axis=1), p[:, 6]], axis=1)
  got = np.stack([rows["teacher/logits"][i] for i in range(len(mean))])
  np.testing.assert_allclose(1 / (1 + np.exp(-got)), want, atol=1e-5)
  np.testing.assert_allclose(
      np.stack([rows["teacher/pooled"][i] for i in range(len(mean))]), mean,
      rtol=1e-4, atol=1e-3)
  spec = teacher_store.manifest(config, source)
  assert spec["teacher"]["spec"]["input"]["units"] == "uV"
  assert spec["outputs"] == {"logits": [[5], "float32"],
                             "pooled": [[3], "float32"]}


@pytest.mark.parametrize("model,changes,field", [
    (dict(samples=700), {}, "input.samples: the graph's input is"),
    (None, {"input.name": "ecg"}, r"input.name: 'ecg'; the graph's inputs"),
    (None, {"outputs.embedding": {"kind": "features"}},
     "outputs.embedding: the graph has no such output"),
    (None, {"classes": [f"s{i}" for i in range(6)],
            "class_map.CD": ["s4", "s5"], "class_map.HYP": ["s5"]},
     "outputs.scores: the graph returns"),
])
def test_a_graph_that_does_not_fit_its_spec_is_refused(
    tfds_dir, files, model, changes, field):
  onnx_path, spec_path = files(_spec(**changes),
                               _graph(**model) if model else None)
  with pytest.raises(spec_lib.SpecError, match=f"{spec_path}: {field}"):
    onnx_teacher.source(_config(tfds_dir, onnx_path, spec_path))


def test_distils_from_the_store_without_a_jax_teacher(tfds_dir, files,
                                                      tmp_path):
  onnx_path, spec_path = files()
  config = _config(tfds_dir, onnx_path, spec_path,
                   "mode=distill,loss=rkd")
  config.teacher.store_dtype = "float16"
  results = loop.fit(config, str(tmp_path / "student"))
  assert np.isfinite(results["validation/macro_auc"])
  store = os.listdir(os.path.join(os.path.dirname(onnx_path),
                                  "teacher_store"))
  assert len(store) == 1
  shard = os.path.join(os.path.dirname(onnx_path), "teacher_store", store[0],
                       "shard-00000")
  assert np.load(os.path.join(shard, "pooled.npy")).dtype == np.float16
  # FitNet reads the teacher's tokens, which this graph does not export.
  with pytest.raises(config_lib.ConfigError, match=r"config.loss.terms."
                     r"fitnet reads the teacher's tap 'tokens'.*exports the "
                     r"features \['pooled'\].*tap 'tokens'\) or turn the "
                     r"term off"):
    loop.fit(_config(tfds_dir, onnx_path, spec_path,
                     "mode=distill,loss=fitnet"), str(tmp_path / "fitnet"))
  config = _config(tfds_dir, onnx_path, spec_path)
  config.teacher.init = "workdir/teacher"
  with pytest.raises(config_lib.ConfigError, match="teacher.init.*one "
                     "teacher"):
    loop.fit(config, str(tmp_path / "both"))


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_write_one_process_store(tfds_dir, files, tmp_path):
  """`python -m evl_ecg_jax.teachers` in two local processes (each writes
  every other shard, then both read the whole store) gives the store of
  one process, file for file."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  onnx_path, spec_path = files()
  args = ["-m", "evl_ecg_jax.teachers",
          "--config=configs/default.py:mode=distill,loss=rkd,runlocal",
          f"--config.data.data_dir={tfds_dir}",
          "--config.data.eval_batch_size=2",  # several shards of 16 batches
          f"--config.teacher.onnx={onnx_path}",
          f"--config.teacher.onnx_spec={spec_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def start(store, extra=()):
    log = open(tmp_path / f"{store}{''.join(extra)[-1:]}.log", "w")
    return subprocess.Popen(
        [sys.executable, *args, f"--config.teacher.store_dir="
         f"{tmp_path / store}", *extra], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT), log
  port = _free_port()
  procs = [start("one")] + [start("two", (
      "--jax_distributed", f"--coordinator_address=localhost:{port}",
      "--num_processes=2", f"--process_id={i}")) for i in range(2)]
  for proc, log in procs:
    proc.wait(timeout=300)
    log.close()
    assert proc.returncode == 0, open(log.name).read()[-3000:]
  (key,) = [d for d in os.listdir(tmp_path / "one")
            if os.path.isdir(tmp_path / "one" / d)]
  one, two = tmp_path / "one" / key, tmp_path / "two" / key
  files_of = lambda root: sorted(
      os.path.relpath(os.path.join(d, f), root)
      for d, _, names in os.walk(root) for f in names if f != "log.txt")
  assert files_of(one) == files_of(two)
  shards = [f for f in files_of(one) if f.endswith("ids.npy")]
  assert len(shards) >= 3
  for name in files_of(one):
    assert (one / name).read_bytes() == (two / name).read_bytes(), name
