"""A foreign teacher: an ONNX graph run with onnxruntime on the CPU, read
through its spec (teachers/spec.py), as a teacher-output store source.

Its outputs for the training split are written once to the store
(train/teacher_store.py); distillation then reads the store and never
needs the graph, nor a JAX teacher.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np

from evl_ecg_jax.data import pipeline
from evl_ecg_jax.teachers import spec as spec_lib
from evl_ecg_jax.train import teacher_store

SpecError = spec_lib.SpecError


def _session(path: str):
  missing = [m for m in ("onnx", "onnxruntime")
             if importlib.util.find_spec(m) is None]
  if missing:
    raise SpecError(f"config.teacher.onnx={path!r}: ONNX teachers need the "
                    f"[export] extra ({', '.join(missing)} not installed): "
                    "pip install -e '.[export]'.")
  if not os.path.isfile(path):
    raise SpecError(f"config.teacher.onnx={path!r}: no such file.")
  from evl_ecg_jax.export import runtime  # pylint: disable=g-import-not-at-top
  try:
    return runtime.session(path)
  except Exception as e:  # pylint: disable=broad-except  (onnxruntime's own)
    raise SpecError(f"config.teacher.onnx={path!r}: onnxruntime cannot load "
                    f"it ({type(e).__name__}: {e}).") from None


def _check_graph(sess, spec) -> int:
  """The graph's input and outputs against the spec; returns its fixed
  batch size (0: dynamic)."""
  fail = lambda field, msg: SpecError(f"{spec.path}: {field}: {msg}")
  inputs = {i.name: i for i in sess.get_inputs()}
  inp = spec.input
  if inp["name"] not in inputs:
    raise fail("input.name", f"{inp['name']!r}; the graph's inputs are "
               f"{sorted(inputs)}")
  shape = inputs[inp["name"]].shape
  if len(shape) != 3:
    raise fail("input.layout", f"the graph's input {inp['name']!r} has "
               f"shape {shape}; expected [{inp['layout']}]")
  dims = {"input.samples": int(inp["samples"]),
          "input.leads": len(inp["leads"])}
  order = (("input.leads", "input.samples")
           if inp["layout"] == "batch,leads,samples"
           else ("input.samples", "input.leads"))
  for dim, field in zip(shape[1:], order):
    if isinstance(dim, int) and dim != dims[field]:
      raise fail(field, f"the graph's input is {shape} ({inp['layout']}); "
                 f"the spec gives {dims[field]}")
  outputs = {o.name for o in sess.get_outputs()}
  for name in spec.outputs:
    if name not in outputs:
      raise fail(f"outputs.{name}", f"the graph has no such output; its "
                 f"outputs are {sorted(outputs)}")
  return shape[0] if isinstance(shape[0], int) else 0


def source(config, batch_size: int = 64) -> teacher_store.Source:
  """The store source of `config.teacher.onnx` read through
  `config.teacher.onnx_spec` (SpecError naming the spec field)."""
  path = os.path.expanduser(config.teacher.onnx)
  sess = _session(path)
  spec = spec_lib.load(os.path.expanduser(config.teacher.onnx_spec),
                       config.data.class_names)
  fixed = _check_graph(sess, spec)
  fs = config.data.sampling_rate
  names = list(spec.outputs)

  def run(x):
    size = fixed or batch_size
    out = []
    for i in range(0, len(x), size):
      chunk = x[i:i + size]
      n = len(chunk)
      if fixed and n < fixed:
        chunk = np.concatenate([chunk, np.zeros(
            (fixed - n,) + chunk.shape[1:], np.float32)])
      out.append([v[:n] for v in sess.run(names, {spec.input["name"]: chunk})])
    return {name: np.concatenate([o[k] for o in out])
            for k, name in enumerate(names)}

  def predict(ecg):
    x = np.stack([spec_lib.adapt(np.asarray(r), fs, spec) for r in ecg])
    raw = run(x)
    rows = {"logits": spec_lib.to_logits(raw[spec.logits_output], spec)}
    rows.update({tap: np.asarray(raw[name], np.float32)
                 for tap, name in spec.taps.items()})
    return rows

  example = np.asarray(pipeline.example(config.data)["ecg"])[None]
  shapes = _check_outputs(run(np.stack([spec_lib.adapt(example[0], fs,
                                                       spec)])), spec)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return teacher_store.Source(
      identity=dict(onnx=os.path.basename(path), onnx_sha256=digest,
                    spec=spec.as_dict()),
      outputs=dict(logits=[len(config.data.class_names)], **{
          tap: shapes[name] for tap, name in spec.taps.items()}),
      predict=predict, raw=True)


def _check_outputs(raw, spec) -> dict:
  """{output: per-record shape} of one record's outputs, checked."""
  fail = lambda field, msg: SpecError(f"{spec.path}: {field}: {msg}")
  shapes = {name: list(np.shape(v)[1:]) for name, v in raw.items()}
  cls = spec.logits_output
  if shapes[cls] != [len(spec.classes)]:
    raise fail(f"outputs.{cls}", f"the graph returns {shapes[cls]} per "
               f"record; spec.classes names {len(spec.classes)} classes")
  for name, out in spec.outputs.items():
    if out["kind"] == "features" and len(shapes[name]) not in (1, 2):
      raise fail(f"outputs.{name}", f"features of shape {shapes[name]} per "
                 "record; expected [D] (pooled) or [N, D] (tokens)")
  return shapes
