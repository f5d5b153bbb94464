"""Exports a trained run: float32 / float16 / int8 ONNX graphs, each checked
for parity with the JAX model on a labelled split, written to one folder.

The folder appears complete or not at all: everything is written to a
temporary sibling folder, renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import onnx

from evl_ecg_jax.data import pipeline
from evl_ecg_jax.export import graph
from evl_ecg_jax.export import parity
from evl_ecg_jax.export import quantize
from evl_ecg_jax.export import runtime
from evl_ecg_jax.export import trained as trained_lib
from evl_ecg_jax.models import layers

PRECISIONS = ("float32", "float16", "int8")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to export and how it is checked (the CLI's flags)."""
  precisions: tuple[str, ...] = PRECISIONS
  batch: int = 0  # 0: dynamic batch; N: the graph takes exactly N ECGs.
  checkpoint: str = "best"  # best | latest
  calibration_examples: int = 512  # int8: ECGs drawn from the train split
  calibration_seed: int = 0
  calibration_method: str = "minmax"  # minmax | percentile
  # int8: 7-bit weights (|w| <= 64). Without VNNI, x86 CPUs multiply uint8
  # activations by int8 weights with VPMADDUBSW, which adds pairs of
  # products into int16 and saturates when |w| reaches 128 (2*255*127 >
  # 32767); on AVX-512 VNNI the sums are exact. With 7-bit weights the pair
  # sums stay within 2*255*64 = 32640, so every CPU computes the same
  # integers (onnxruntime's quantisation docs name this remedy). Measured
  # on a fresh AVX2 box without it: int8 moved the test AUC by 0.75 pt
  # against 0.5 pt allowed (issue 21).
  reduce_range: bool = True
  split: str = "test"  # parity split
  parity_examples: int = 0  # 0: the whole split
  opset: int = graph.OPSET
  data_dir: str = ""  # "": the run's config.data.data_dir
  manual_dir: str = ""  # "": the run's config.data.manual_dir

  def check(self):
    unknown = [p for p in self.precisions if p not in PRECISIONS]
    if unknown or not self.precisions:
      raise trained_lib.ExportError(
          f"--precisions={','.join(self.precisions)}: expected a non-empty "
          f"subset of {','.join(PRECISIONS)}.")
    if self.batch < 0:
      raise trained_lib.ExportError(
          f"--batch={self.batch}: expected 0 (dynamic) or a positive size.")


def _metadata(trained, shape, options) -> dict:
  """What a deployed graph expects and where it came from."""
  data = trained.config.data
  prep = data.transforms
  samples, leads = shape
  return {
      "classes": list(data.class_names),
      "input": {"samples": samples, "leads": list(layers.LEADS)
                if leads == len(layers.LEADS) else leads,
                "sampling_rate_hz": prep.resample_hz or data.sampling_rate,
                "batch": options.batch or "dynamic",
                "layout": "[batch, samples, leads], float32, as stored "
                          "(PTB-XL / CinC: mV)"},
      "preprocessing": {"bandpass_hz": list(prep.bandpass_hz),
                        "standardize": bool(prep.standardize),
                        "resample_hz": prep.resample_hz},
      "output": "per-class sigmoid probabilities [batch, classes]",
      "model": trained.config[trained.block].name, "block": trained.block,
      "source": {"workdir": os.path.abspath(trained.workdir),
                 "checkpoint": trained.checkpoint},
  }


def teacher_spec(trained, shape) -> dict | None:
  """The graph as a foreign teacher (evl_ecg_jax/teachers/spec.py): the
  stored records' leads and units, the run's preprocessing, its sigmoid
  probabilities over the dataset's classes. None when the model reads
  other than the 12 stored leads."""
  data, (samples, leads) = trained.config.data, shape
  if leads != len(layers.LEADS):
    return None
  prep = data.transforms
  return {"input": {"name": graph.INPUT, "layout": "batch,samples,leads",
                    "sampling_rate_hz": prep.resample_hz or data.sampling_rate,
                    "samples": samples, "leads": list(layers.LEADS),
                    "units": "mV", "bandpass_hz": list(prep.bandpass_hz),
                    "standardize": bool(prep.standardize)},
          "outputs": {graph.OUTPUT: {"kind": "probabilities",
                                     "activation": "sigmoid"}},
          "classes": list(data.class_names)}


def _variants(trained, shape, options, calibration
              ) -> dict[str, onnx.ModelProto]:
  float32 = graph.convert(trained.probabilities(), shape,
                          batch=options.batch, opset=options.opset)
  out = {"float32": float32}
  if "float16" in options.precisions:
    out["float16"] = quantize.float16(float32)
  if "int8" in options.precisions:
    out["int8"] = quantize.int8(float32, calibration, batch=options.batch,
                                method=options.calibration_method,
                                reduce_range=options.reduce_range)
  return {p: out[p] for p in options.precisions}


def export(workdir: str, out_dir: str | None = None,
           options: Options = Options()) -> dict:
  """Exports the run in `workdir` to `out_dir` (default <workdir>/export).

  Writes model_<precision>.onnx, export.json (metadata, files, sizes,
  parity on `options.split` with each bound) and teacher_spec.json (the
  graphs as a foreign teacher, `teacher_spec`); returns export.json's dict.
  """
  options.check()
  trained = trained_lib.load(workdir, options.checkpoint, data_overrides={
      "data_dir": options.data_dir, "manual_dir": options.manual_dir})
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "export"))
  shape = trained.input_shape
  meta = _metadata(trained, shape, options)
  calibration = np.zeros((0,) + shape, np.float32)
  if "int8" in options.precisions:
    calibration = pipeline.sample(trained.config.data, "train",
                                  options.calibration_examples,
                                  options.calibration_seed)["ecg"]
  variants = _variants(trained, shape, options, calibration)
  records = pipeline.split_records(trained.config.data, options.split,
                                   options.parity_examples)
  ecg, labels = records["ecg"], records["labels"]
  reference = trained.predict(ecg)
  report = {**meta, "opset": options.opset, "parity_split": options.split,
            "calibration": {"split": "train", "examples": len(calibration),
                            "seed": options.calibration_seed,
                            "method": options.calibration_method,
                            "reduce_range": options.reduce_range},
            "variants": {}}
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out_dir))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private (0700)
  try:
    for precision, model in variants.items():
      name = f"model_{precision}.onnx"
      path = os.path.join(tmp, name)
      onnx.save(graph.annotate(model, dict(meta, precision=precision)), path)
      probs = runtime.predict(runtime.session(path), ecg)
      measures = parity.compare(reference, probs, labels,
                                trained.config.data.class_names)
      report["variants"][precision] = {
          "file": name, "bytes": os.path.getsize(path), **measures,
          "bound": parity.check(precision, measures)}
    with open(os.path.join(tmp, "export.json"), "w") as f:
      json.dump(report, f, indent=2)
    spec = teacher_spec(trained, shape)
    if spec is not None:  # read back as a teacher: docs/teachers.md
      with open(os.path.join(tmp, "teacher_spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    _replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def table(report: dict) -> str:
  """Markdown table of the variants in an export report."""
  lines = ["| variant | MB | max abs Δp | macro-AUC | ΔAUC (pt) | bound |",
           "|---|---|---|---|---|---|"]
  for name, v in report["variants"].items():
    b = v["bound"]
    lines.append(
        f"| {name} | {v['bytes'] / 1e6:.3f} | {v['max_abs_diff']:.2e} | "
        f"{v['macro_auc']:.4f} | {v['delta_auc_points']:+.3f} | "
        f"{b['measure']} <= {b['bound']}: {'ok' if b['ok'] else 'MISSED'} |")
  return "\n".join(lines)


def missed(report: dict) -> list[str]:
  """The variants of an export report outside their parity bound."""
  return [name for name, v in report["variants"].items()
          if not v["bound"]["ok"]]


def _replace(src: str, dst: str) -> None:
  """Moves folder `src` to `dst`, replacing an earlier export there."""
  old = None
  if os.path.exists(dst):
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
  os.replace(src, dst)
  if old:
    shutil.rmtree(old)
