"""Edge export: ONNX graphs of a trained student, quantised, and their parity.

A CNN student trained for 150 steps on the embedded synthetic ECGs is
exported (float32, float16, int8 calibrated on the training split); each
graph is run here with onnxruntime directly and compared with the JAX
model's probabilities on the whole test split (sklearn ROC-AUC), so the
export's own parity report is checked, not trusted.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

from configs import default
from conftest import REPO
from conftest import family_params
from conftest import short_run
from evl_ecg_jax import checkpoint
from evl_ecg_jax import models
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.export import builder
from evl_ecg_jax.export import graph
from evl_ecg_jax.export import parity
from evl_ecg_jax.export import rewrite
from evl_ecg_jax.export import runtime
from evl_ecg_jax.export import trained as trained_lib
from evl_ecg_jax.train import loop

STEPS = 150


def _config(tfds_dir, arg="mode=distill,loss=ce"):
  return short_run(tfds_dir, arg, STEPS)


@pytest.fixture(scope="module")
def student_dir(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("student"))
  loop.fit(_config(tfds_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "student")
  report = builder.export(student_dir, out,
                          builder.Options(calibration_examples=128))
  return out, report


@pytest.fixture(scope="module")
def test_split(tfds_dir):
  """The JAX student's inputs, labels and probabilities on the test split,
  computed here from the checkpoint (not by the exporter)."""
  config = _config(tfds_dir)
  ecg, labels = [], []
  for batch in pipeline.eval_batches(config.data, "test"):
    ecg.append(batch["ecg"][batch["mask"]])
    labels.append(batch["labels"][batch["mask"]])
  return np.concatenate(ecg), np.concatenate(labels)


@pytest.fixture(scope="module")
def jax_probs(student_dir, test_split, tfds_dir):
  config = _config(tfds_dir)
  model = models.get(config.student, 5)
  params = checkpoint.load_params(student_dir, "best")["model"]
  logits, _ = model.apply({"params": params}, jnp.asarray(test_split[0]),
                          taps=())
  return np.asarray(jax.nn.sigmoid(logits))


def _run(path, ecg):
  sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  return sess.run(None, {sess.get_inputs()[0].name: ecg})[0]


def _macro_auc(labels, probs):
  return np.mean([roc_auc_score(labels[:, c], probs[:, c])
                  for c in range(labels.shape[1])])


def test_student_learned_something(test_split, jax_probs):
  # Parity in AUC is only meaningful for a model whose ranking matters.
  assert _macro_auc(test_split[1], jax_probs) > 0.7


def test_float32_graph_reproduces_jax(exported, test_split, jax_probs):
  out, report = exported
  probs = _run(os.path.join(out, "model_float32.onnx"), test_split[0])
  assert probs.shape == jax_probs.shape == (64, 5)
  assert probs.dtype == np.float32
  assert np.abs(probs - jax_probs).max() <= 1e-4
  v = report["variants"]["float32"]
  assert v["n"] == 64 and v["bound"]["ok"]
  np.testing.assert_allclose(v["max_abs_diff"],
                             np.abs(probs - jax_probs).max(), atol=1e-6)


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_quantised_auc_within_half_a_point(exported, test_split, jax_probs,
                                           precision):
  out, report = exported
  probs = _run(os.path.join(out, f"model_{precision}.onnx"), test_split[0])
  labels = test_split[1]
  delta = 100 * (_macro_auc(labels, probs) - _macro_auc(labels, jax_probs))
  assert abs(delta) <= 0.5, delta
  assert 0 < np.abs(probs - jax_probs).max() < 0.1  # really quantised
  np.testing.assert_allclose(
      report["variants"][precision]["delta_auc_points"], delta, atol=1e-6)


def test_int8_graph_is_int8(exported):
  out, report = exported
  model = onnx.load(os.path.join(out, "model_int8.onnx"))
  producers = {o: n for n in model.graph.node for o in n.output}
  inits = {i.name: i for i in model.graph.initializer}
  convs = [n for n in model.graph.node if n.op_type == "Conv"]
  assert len(convs) == 13  # stem + 4 stages x (2 convs + skip)
  for conv in convs:  # activations and weights both come dequantised
    for name in conv.input[:2]:
      dq = producers[name]
      assert dq.op_type == "DequantizeLinear"
      source = dq.input[0]
      if source in inits:  # a weight: stored as int8, in 7 bits
        assert inits[source].data_type == onnx.TensorProto.INT8
        # |w| <= 64: uint8 x int8 pair sums fit int16 (no saturation on
        # CPUs without VNNI), so every x86 CPU computes the same integers.
        weights = onnx.numpy_helper.to_array(inits[source]).astype(int)
        assert 48 <= np.abs(weights).max() <= 64
      else:  # an activation: quantised at run time with calibrated scales
        assert producers[source].op_type == "QuantizeLinear"
  float_weights = sum(
      onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(
          os.path.join(out, "model_float32.onnx")).graph.initializer)
  int8_weights = sum(onnx.numpy_helper.to_array(i).nbytes
                     for i in model.graph.initializer
                     if i.data_type == onnx.TensorProto.INT8)
  assert int8_weights < float_weights / 3.5
  assert report["calibration"]["reduce_range"] is True


def test_float16_graph_keeps_float32_io(exported, test_split):
  out, _ = exported
  model = onnx.load(os.path.join(out, "model_float16.onnx"))
  kinds = {i.data_type for i in model.graph.initializer
           if len(i.dims) == 3}  # conv kernels
  assert kinds == {onnx.TensorProto.FLOAT16}
  for io in (model.graph.input[0], model.graph.output[0]):
    assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_metadata_says_what_the_graph_expects(exported, tfds_dir):
  out, report = exported
  config = _config(tfds_dir)
  for precision in builder.PRECISIONS:
    meta = graph.metadata(onnx.load(os.path.join(out,
                                                 f"model_{precision}.onnx")))
    assert meta["precision"] == precision
    assert meta["classes"] == list(config.data.class_names)
    assert meta["input"]["samples"] == 1000
    assert meta["input"]["leads"][:3] == ["I", "II", "III"]
    assert meta["input"]["sampling_rate_hz"] == 100
    assert meta["preprocessing"]["standardize"] is False
  assert report["calibration"]["examples"] == 128  # the whole tiny split
  with open(os.path.join(out, "export.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))


def test_dynamic_batch_gives_batch_independent_rows(exported, test_split):
  out, _ = exported
  path = os.path.join(out, "model_float32.onnx")
  ecg = test_split[0][:5]
  together = _run(path, ecg)
  alone = np.concatenate([_run(path, ecg[i:i + 1]) for i in range(5)])
  np.testing.assert_allclose(alone, together, atol=1e-6)


def test_fixed_batch_export(student_dir, tmp_path, test_split, jax_probs):
  out = str(tmp_path / "fixed")
  report = builder.export(student_dir, out, builder.Options(
      precisions=("float32",), batch=4, parity_examples=30))
  assert report["variants"]["float32"]["n"] == 30
  sess = runtime.session(os.path.join(out, "model_float32.onnx"), threads=1)
  assert sess.get_inputs()[0].shape == [4, 1000, 12]
  probs = runtime.predict(sess, test_split[0][:7])  # padded to 2 x 4
  np.testing.assert_allclose(probs, jax_probs[:7], atol=1e-4)
  with pytest.raises(Exception, match="(?i)dimension|shape"):
    sess.run(None, {"ecg": test_split[0][:3]})


@pytest.mark.parametrize(
    "family", family_params(["xresnet1d", "convnext1d", "vit1d"]))
def test_every_model_family_converts(family):
  model = models.get(default.get_config(f"model={family}").student, 5)
  x = np.random.default_rng(0).normal(size=(3, 1000, 12)).astype(np.float32)
  params = models.init_params(model, jax.random.PRNGKey(0), x[:1])
  fn = lambda ecg: jax.nn.sigmoid(model.apply({"params": params}, ecg,
                                              taps=())[0])
  onnx_model = graph.convert(fn, (1000, 12))
  probs = runtime.predict(runtime.session(onnx_model), x)
  np.testing.assert_allclose(probs, np.asarray(fn(x)), atol=1e-4)


def test_failed_export_leaves_the_previous_one(student_dir, tmp_path,
                                               monkeypatch):
  out = tmp_path / "export"
  builder.export(student_dir, str(out), builder.Options(
      precisions=("float32",), parity_examples=16))
  before = (out / "model_float32.onnx").read_bytes()

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(parity, "compare", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    builder.export(student_dir, str(out), builder.Options(
        precisions=("float32",), parity_examples=16))
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary left
  assert (out / "model_float32.onnx").read_bytes() == before
  with pytest.raises(RuntimeError):
    builder.export(student_dir, str(tmp_path / "new"), builder.Options(
        precisions=("float32",), parity_examples=16))
  assert not (tmp_path / "new").exists()


def test_bad_requests_name_what_is_wrong(tmp_path, student_dir, monkeypatch):
  with pytest.raises(trained_lib.ExportError, match="no checkpoint in"):
    builder.export(str(tmp_path), None, builder.Options())
  with pytest.raises(trained_lib.ExportError, match="--precisions=int4"):
    builder.export(student_dir, None, builder.Options(precisions=("int4",)))
  with pytest.raises(trained_lib.ExportError, match="--batch=-1"):
    builder.export(student_dir, None, builder.Options(batch=-1))
  vlm = dict(checkpoint.load_config(student_dir), model_kind="vlm")
  monkeypatch.setattr(checkpoint, "load_config", lambda workdir: vlm)
  with pytest.raises(trained_lib.ExportError, match="model_kind='vlm'"):
    trained_lib.load(student_dir)


def test_parity_measures_by_hand():
  labels = np.array([[1], [0], [1], [0]])
  ref = np.array([[0.9], [0.1], [0.6], [0.4]], np.float32)
  same = parity.compare(ref, ref, labels, ["A"])
  assert same["max_abs_diff"] == 0 and same["delta_auc_points"] == 0
  swapped = np.array([[0.9], [0.1], [0.4], [0.6]], np.float32)  # 1 of 4 pairs
  out = parity.compare(ref, swapped, labels, ["A"])
  np.testing.assert_allclose(out["max_abs_diff"], 0.2, atol=1e-6)
  np.testing.assert_allclose(out["mean_abs_diff"], 0.1, atol=1e-6)
  assert out["reference_macro_auc"] == 1.0 and out["macro_auc"] == 0.75
  assert out["delta_auc_points"] == -25.0
  assert not parity.check("int8", out)["ok"]
  assert parity.check("float32", same)["ok"]
  with pytest.raises(ValueError, match="shape"):
    parity.compare(ref, ref[:2], labels, ["A"])


def test_calibration_sample_is_seeded_and_distinct(tfds_dir):
  data = _config(tfds_dir).data
  a = pipeline.sample(data, "train", 40, seed=0)
  b = pipeline.sample(data, "train", 40, seed=0)
  c = pipeline.sample(data, "train", 40, seed=1)
  assert a["ecg"].shape == (40, 1000, 12)
  np.testing.assert_array_equal(a["id"], b["id"])
  assert len(set(a["id"].tolist())) == 40
  assert set(a["id"].tolist()) != set(c["id"].tolist())
  src = pipeline.source(data, "train")
  first = int(np.flatnonzero(
      [src[i]["id"] == a["id"][0] for i in range(len(src))])[0])
  np.testing.assert_array_equal(a["ecg"][0], src[first]["ecg"])
  assert len(pipeline.sample(data, "train", 10_000, seed=0)["id"]) == 128


def test_cli_exports_and_reports(student_dir, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "evl_ecg_jax.export", f"--workdir={student_dir}",
       f"--out={out}", "--precisions=float32,int8", "--parity_examples=32",
       "--calibration_examples=64"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| int8 |" in proc.stdout and "MISSED" not in proc.stdout
  assert sorted(os.listdir(out)) == ["export.json", "model_float32.onnx",
                                     "model_int8.onnx", "teacher_spec.json"]


def _group_norm_graph(x_shape, groups, scale_as_input=False):
  """One GroupNormalization (opset 21) node with per-channel scale/bias."""
  rng = np.random.default_rng(0)
  channels = x_shape[1]
  scale = rng.normal(size=channels).astype(np.float32)
  bias = rng.normal(size=channels).astype(np.float32)
  inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                               x_shape)]
  inits = [onnx.numpy_helper.from_array(bias, "bias")]
  if scale_as_input:
    inputs.append(onnx.helper.make_tensor_value_info(
        "scale", onnx.TensorProto.FLOAT, [channels]))
  else:
    inits.append(onnx.numpy_helper.from_array(scale, "scale"))
  node = onnx.helper.make_node("GroupNormalization", ["x", "scale", "bias"],
                               ["y"], num_groups=groups, epsilon=1e-5)
  out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                           x_shape)
  model = onnx.helper.make_model(
      onnx.helper.make_graph([node], "gn", inputs, [out], inits),
      opset_imports=[onnx.helper.make_opsetid("", 21)])
  return model, scale, bias


def test_group_norm_rewrite_matches_numpy_reference():
  model, scale, bias = _group_norm_graph([2, 8, 20], groups=2)
  x = np.random.default_rng(1).normal(3.0, 2.0, (2, 8, 20)).astype(np.float32)
  # GroupNorm by hand: statistics over each group's 4 channels x 20 steps.
  g = x.reshape(2, 2, 4 * 20).astype(np.float64)
  norm = ((g - g.mean(-1, keepdims=True))
          / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(2, 8, 20)
  expected = norm * scale[:, None] + bias[:, None]
  original = _run_model(model, {"x": x})
  rewritten = rewrite.group_norm_to_instance_norm(model)
  assert "GroupNormalization" not in {n.op_type for n in rewritten.graph.node}
  np.testing.assert_allclose(original, expected, atol=1e-5)
  np.testing.assert_allclose(_run_model(rewritten, {"x": x}), expected,
                             atol=1e-5)


def test_group_norm_rewrite_leaves_what_it_cannot_prove():
  for model in (_group_norm_graph([2, 8, 4, 5], groups=2)[0],  # rank 4
                _group_norm_graph([2, 8, 20], 2, scale_as_input=True)[0]):
    rewritten = rewrite.group_norm_to_instance_norm(model)
    assert [n.op_type for n in rewritten.graph.node] == ["GroupNormalization"]


def _run_model(model, feeds):
  sess = ort.InferenceSession(model.SerializeToString(),
                              providers=["CPUExecutionProvider"])
  return sess.run(None, feeds)[0]


def test_report_table_flags_a_missed_bound():
  measures = dict(n=10, max_abs_diff=0.2, mean_abs_diff=0.1, macro_auc=0.7,
                  reference_macro_auc=0.8, delta_auc_points=-10.0,
                  abs_delta_auc_points=10.0)
  ok = dict(measures, max_abs_diff=1e-7, delta_auc_points=0.0,
            abs_delta_auc_points=0.0)
  report = {"variants": {
      "float32": dict(ok, bytes=2000, bound=parity.check("float32", ok)),
      "int8": dict(measures, bytes=1000,
                   bound=parity.check("int8", measures))}}
  text = builder.table(report)
  assert "| float32 | 0.002 |" in text and "max_abs_diff <= 0.0001: ok" in text
  assert "abs_delta_auc_points <= 0.5: MISSED" in text
  assert builder.missed(report) == ["int8"]


def test_split_records_are_the_eval_batches_in_order(tfds_dir):
  data = _config(tfds_dir).data
  ecg, labels, ids = [], [], []
  for batch in pipeline.eval_batches(data, "test"):
    keep = batch["mask"]
    ecg.append(batch["ecg"][keep])
    labels.append(batch["labels"][keep])
    ids.append(batch["id"][keep])
  every = pipeline.split_records(data, "test")
  np.testing.assert_array_equal(every["ecg"], np.concatenate(ecg))
  np.testing.assert_array_equal(every["labels"], np.concatenate(labels))
  np.testing.assert_array_equal(every["id"], np.concatenate(ids))
  first = pipeline.split_records(data, "test", limit=10)
  np.testing.assert_array_equal(first["id"], every["id"][:10])
