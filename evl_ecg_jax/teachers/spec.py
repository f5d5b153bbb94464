"""The declarative spec of a foreign teacher: what its graph reads and
returns, and how that maps onto the dataset.

A JSON file (read with `json`, nothing evaluated), e.g. for a CODE-like
12-lead ResNet (400 Hz, 4096 samples, leads first, µV, six statements):

  {"input": {"name": "ecg", "layout": "batch,leads,samples",
             "sampling_rate_hz": 400, "samples": 4096,
             "leads": ["I", "II", "III", "aVR", "aVL", "aVF",
                       "V1", "V2", "V3", "V4", "V5", "V6"],
             "units": "uV"},
   "outputs": {"probs": {"kind": "probabilities", "activation": "sigmoid"},
               "embedding": {"kind": "features", "tap": "pooled"}},
   "classes": ["1dAVb", "RBBB", "LBBB", "SB", "AF", "ST"],
   "class_map": {"CD": ["1dAVb", "RBBB", "LBBB"], ...},
   "combine": "noisy_or"}

input: the graph's input `name`; `layout` "batch,samples,leads" or
  "batch,leads,samples"; the `sampling_rate_hz` it was trained at (records
  are resampled to it); `samples` it reads (longer records are cropped,
  `crop` "center" or "start"; shorter ones zero-padded at the end); its
  `leads` in order (names of the dataset's 12 leads, a subset allowed);
  `units` "mV", "uV" or "V" (the datasets store mV) times `scale` (default
  1); optional `bandpass_hz` [low, high] at the stored rate and
  `standardize` (per-lead z-score), in the order of config.data.transforms.
outputs: graph output name -> `kind` "logits" or "probabilities" (one
  output, [B, len(classes)], `activation` "sigmoid" (multi-label) or
  "softmax") or "features" ([B, D] or tokens [B, N, D], stored as the tap
  named by `tap`, default the output's name).
classes: the graph's output classes in order. class_map: each dataset class
  (config.data.class_names) -> the graph classes it is made of; `combine`
  says how several become one: "max" or "noisy_or" (1 − Π(1 − p)) of
  sigmoid probabilities, "sum" of softmax ones. A class mapped to one
  sigmoid logit keeps it as it is; anything else is stored as the logit of
  its probability (float32 probabilities saturate at |logit| ≈ 16.6).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from evl_ecg_jax.data import transforms
from evl_ecg_jax.models import layers

LAYOUTS = ("batch,samples,leads", "batch,leads,samples")
UNITS = {"mV": 1.0, "uV": 1000.0, "V": 1e-3}  # per stored mV
KINDS = ("logits", "probabilities", "features")
COMBINE = {"sigmoid": ("max", "noisy_or"), "softmax": ("sum",)}
_EPS = 2.0**-24  # float32 probabilities closer to 0 or 1 than this are clipped


class SpecError(ValueError):
  """A spec that cannot work; names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed, validated spec (see the module docstring)."""
  path: str
  input: dict
  outputs: dict
  classes: tuple
  class_map: dict
  combine: str

  @property
  def logits_output(self) -> str:
    return next(n for n, o in self.outputs.items() if o["kind"] != "features")

  @property
  def taps(self) -> dict:
    """{tap: graph output} of the feature outputs."""
    return {o["tap"]: n for n, o in self.outputs.items()
            if o["kind"] == "features"}

  def as_dict(self) -> dict:
    return dict(input=self.input, outputs=self.outputs,
                classes=list(self.classes), class_map=self.class_map,
                combine=self.combine)


def load(path: str, class_names) -> Spec:
  """The spec at `path`, checked against itself and the dataset's classes
  (SpecError naming the field)."""
  if not os.path.isfile(path):
    raise SpecError(f"config.teacher.onnx_spec={path!r}: no such file.")
  with open(path, encoding="utf-8") as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise SpecError(f"{path}: not JSON ({e}).") from None
  fail = lambda field, msg: SpecError(f"{path}: {field}: {msg}")
  if not isinstance(raw, dict):
    raise fail("(top level)", "expected an object")
  unknown = set(raw) - {"input", "outputs", "classes", "class_map",
                        "combine", "name"}
  if unknown:
    raise fail(sorted(unknown)[0], "unknown field")
  inp = _input(raw.get("input"), fail)
  outputs = _outputs(raw.get("outputs"), fail)
  classes = raw.get("classes")
  if (not isinstance(classes, list) or not classes
      or len(set(classes)) != len(classes)):
    raise fail("classes", "expected a list of distinct class names")
  kind = next(o for o in outputs.values() if o["kind"] != "features")
  combine = raw.get("combine", COMBINE[kind["activation"]][0])
  if combine not in COMBINE[kind["activation"]]:
    raise fail("combine", f"{combine!r}; with {kind['activation']} outputs "
               f"expected one of {COMBINE[kind['activation']]}")
  class_map = _class_map(raw.get("class_map"), classes, class_names, fail)
  return Spec(path, inp, outputs, tuple(classes), class_map, combine)


def _input(inp, fail) -> dict:
  if not isinstance(inp, dict):
    raise fail("input", "expected an object")
  inp = dict(inp)
  inp.setdefault("name", "ecg")
  inp.setdefault("layout", LAYOUTS[0])
  inp.setdefault("crop", "center")
  inp.setdefault("scale", 1.0)
  inp.setdefault("bandpass_hz", [])
  inp.setdefault("standardize", False)
  allowed = {"name", "layout", "sampling_rate_hz", "samples", "leads",
             "units", "crop", "scale", "bandpass_hz", "standardize"}
  if set(inp) - allowed:
    raise fail(f"input.{sorted(set(inp) - allowed)[0]}", "unknown field")
  if inp["layout"] not in LAYOUTS:
    raise fail("input.layout", f"{inp['layout']!r}; expected one of "
               f"{LAYOUTS}")
  for field in ("sampling_rate_hz", "samples"):
    value = inp.get(field)
    if not isinstance(value, (int, float)) or value <= 0:
      raise fail(f"input.{field}", f"{value!r}; expected a positive number")
  leads = inp.get("leads")
  if not isinstance(leads, list) or not leads:
    raise fail("input.leads", f"expected a list of lead names of "
               f"{list(layers.LEADS)}")
  for i, lead in enumerate(leads):
    if lead not in layers.LEADS:
      raise fail(f"input.leads[{i}]", f"{lead!r} is not one of "
                 f"{list(layers.LEADS)}")
  if inp.get("units") not in UNITS:
    raise fail("input.units", f"{inp.get('units')!r}; expected one of "
               f"{sorted(UNITS)}")
  if inp["crop"] not in ("center", "start"):
    raise fail("input.crop", f"{inp['crop']!r}; expected 'center' or "
               "'start'")
  if inp["bandpass_hz"] and len(inp["bandpass_hz"]) != 2:
    raise fail("input.bandpass_hz", "expected [] or [low, high]")
  return inp


def _outputs(outputs, fail) -> dict:
  if not isinstance(outputs, dict) or not outputs:
    raise fail("outputs", "expected an object: graph output name -> kind")
  parsed = {}
  for name, out in outputs.items():
    field = f"outputs.{name}"
    if not isinstance(out, dict) or out.get("kind") not in KINDS:
      raise fail(f"{field}.kind", f"expected one of {KINDS}")
    out = dict(out)
    if out["kind"] == "features":
      out.setdefault("tap", name)
      if out["tap"] == "logits":
        raise fail(f"{field}.tap", "'logits' is the class output's name")
    else:
      out.setdefault("activation", "sigmoid")
      if out["activation"] not in COMBINE:
        raise fail(f"{field}.activation", f"{out['activation']!r}; "
                   f"expected one of {sorted(COMBINE)}")
    parsed[name] = out
  class_outputs = [n for n, o in parsed.items() if o["kind"] != "features"]
  if len(class_outputs) != 1:
    raise fail("outputs", f"expected exactly one 'logits' or "
               f"'probabilities' output; found {class_outputs}")
  return parsed


def _class_map(class_map, classes, class_names, fail) -> dict:
  if class_map is None:  # the graph's classes are the dataset's
    class_map = {c: [c] for c in class_names}
  if not isinstance(class_map, dict):
    raise fail("class_map", "expected an object: dataset class -> graph "
               "classes")
  for name in class_names:
    members = class_map.get(name)
    if not isinstance(members, list) or not members:
      raise fail(f"class_map.{name}", "missing: every dataset class "
                 f"({list(class_names)}) needs a non-empty list of graph "
                 "classes")
    for member in members:
      if member not in classes:
        raise fail(f"class_map.{name}", f"{member!r} is not in classes "
                   f"({classes})")
  extra = sorted(set(class_map) - set(class_names))
  if extra:
    raise fail(f"class_map.{extra[0]}", "not a dataset class "
               f"(config.data.class_names: {list(class_names)})")
  return {name: list(class_map[name]) for name in class_names}


def adapt(ecg: np.ndarray, fs: float, spec: Spec) -> np.ndarray:
  """One stored record [T, 12] (mV, at `fs`, the dataset's lead order) ->
  the graph's input [samples, leads] or [leads, samples], float32."""
  inp = spec.input
  x = ecg[:, [layers.LEADS.index(lead) for lead in inp["leads"]]]
  x = x.astype(np.float64) * UNITS[inp["units"]] * inp["scale"]
  if inp["bandpass_hz"]:
    x = transforms.bandpass(x, fs, *inp["bandpass_hz"])
  if inp["standardize"]:
    x = transforms.standardize(x)
  x = transforms.resample(np.asarray(x, np.float32), fs,
                          inp["sampling_rate_hz"])
  x = fit_length(x, int(inp["samples"]), inp["crop"])
  if inp["layout"] == "batch,leads,samples":
    x = x.T
  return np.ascontiguousarray(x, np.float32)


def fit_length(x: np.ndarray, samples: int, crop: str) -> np.ndarray:
  """[T, L] -> [samples, L]: cropped (centre or start) or zero-padded at
  the end."""
  if len(x) >= samples:
    start = (len(x) - samples) // 2 if crop == "center" else 0
    return x[start:start + samples]
  return np.pad(x, ((0, samples - len(x)), (0, 0)))


def to_logits(values: np.ndarray, spec: Spec) -> np.ndarray:
  """The graph's class output [B, len(classes)] -> logits [B, C] over the
  dataset's classes (`class_map`, `combine`), float32."""
  out = spec.outputs[spec.logits_output]
  v = np.asarray(values, np.float64)
  index = {c: i for i, c in enumerate(spec.classes)}
  if out["activation"] == "sigmoid":
    direct = out["kind"] == "logits"
    if direct and all(len(m) == 1 for m in spec.class_map.values()):
      return np.stack([v[:, index[m[0]]] for m in spec.class_map.values()],
                      axis=1).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-v)) if direct else v
    combined = []
    for members in spec.class_map.values():
      q = p[:, [index[m] for m in members]]
      combined.append(q.max(axis=1) if spec.combine == "max"
                      else 1.0 - np.prod(1.0 - q, axis=1))
    p = np.stack(combined, axis=1)
  else:
    if out["kind"] == "logits":
      v = np.exp(v - v.max(axis=1, keepdims=True))
      v /= v.sum(axis=1, keepdims=True)
    p = np.stack([v[:, [index[m] for m in members]].sum(axis=1)
                  for members in spec.class_map.values()], axis=1)
  p = np.clip(p, _EPS, 1.0 - _EPS)
  return (np.log(p) - np.log1p(-p)).astype(np.float32)
