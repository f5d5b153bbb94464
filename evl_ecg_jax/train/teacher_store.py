"""The teacher-output store: a frozen teacher's outputs for the training
split, written once, sharded by record.

A distillation sweep runs the same frozen teacher over the same records in
every run. Its logits and the feature taps the objective reads are written
once per (teacher, data, preprocessing, taps), for the project's own
teacher with `config.teacher.cache_features` (under its workdir), for a
foreign one (`config.teacher.onnx`, evl_ecg_jax/teachers) always (beside
the .onnx file; `config.teacher.store_dir` moves either):

  teacher_store/<key>/manifest.json   what the store holds (below)
  teacher_store/<key>/shard-00000/    ids.npy, logits.npy, <tap>.npy: the
                                      rows of SHARD_BATCHES eval batches

The manifest names the teacher (its model block or ONNX spec, and a sha256
of its weights), the data and preprocessing (TFDS name, split, sampling
rate, class names, transforms), the outputs with their shapes and dtypes,
and the logit format (full, float32 or float16: config.teacher.store_dtype).
Each shard is written to a temporary folder and renamed into place, so a
shard is there whole or not at all: an interrupted write resumes with the
missing shards, and process p of P writes the shards i ≡ p (mod P) (every
process then reads them all). The training pipeline joins each record's
rows to its example, checking the record id, and the train step skips the
teacher forward.

Augmentations change the input the teacher would see, so a stored teacher
would be answering for another signal: the store with augmentations on is
refused (deterministic preprocessing is fine: it is applied before the
teacher, exactly as in training).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np
import tqdm

from evl_ecg_jax import models
from evl_ecg_jax import parallel
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.data import transforms

PREFIX = "teacher/"
SHARD_BATCHES = 16  # eval batches (data.eval_batch_size records) a shard
FORMAT = 2
# config.teacher.store_dtype: float32, or a 16-bit float that halves the
# store (logits and features alike; docs/teachers.md gives the KD error).
DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class Source:
  """A frozen teacher as the store sees it.

  Attributes:
    identity: the manifest's teacher block (JSON values): what the teacher
      is and a checksum of its weights.
    outputs: {name: per-record shape}: "logits" [C] (over
      config.data.class_names) and the feature taps.
    predict: host ECGs [B, T, L] -> {name: host array [B, ...]}.
    raw: True: the teacher reads the stored records and does its own
      preprocessing (an ONNX teacher's spec); False: it reads them after
      config.data.transforms, as the student does.
  """
  identity: dict
  outputs: dict
  predict: Callable
  raw: bool = False


def jax_source(config, teacher, teacher_params, taps) -> Source:
  """The project's own frozen teacher, pmapped over the local devices: its
  logits and the feature taps `taps` of config.data.transforms' output."""
  block = {k: v for k, v in config.teacher.to_dict().items()
           if k not in models.SOURCE_FIELDS}
  example = np.asarray(pipeline.example(config.data)["ecg"])[None]
  fn = _predictor(teacher, tuple(taps))
  shapes = jax.eval_shape(fn, teacher_params, {"ecg": example})
  p_fn = parallel.pmap_predict(fn)
  n_dev = jax.local_device_count()
  return Source(
      identity=dict(model=block, params_sha256=_digest(teacher_params)),
      outputs={n: list(x.shape[1:]) for n, x in shapes.items()},
      predict=lambda ecg: {k: parallel.merge_outputs(v) for k, v in p_fn(
          teacher_params, parallel.split_batch({"ecg": ecg}, n_dev)).items()})


def _digest(params) -> str:
  """sha256 of the teacher's params (paths, dtypes, shapes and bytes)."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    x = np.asarray(jax.device_get(x))
    h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def check(config) -> None:
  """Raises ValueError naming the field when storing cannot be honest."""
  if transforms.make_augment(config.data.transforms,
                             config.data.sampling_rate) is not None:
    raise ValueError(
        "config.teacher.cache_features=True with training augmentations on "
        "(config.data.transforms: scale / baseline_wander / noise_std / "
        "lead_dropout): the stored teacher would answer for the "
        "un-augmented signal. Turn one of them off.")
  if config.teacher.store_dtype not in DTYPES:
    raise ValueError(f"config.teacher.store_dtype="
                     f"{config.teacher.store_dtype!r}: expected one of "
                     f"{DTYPES}.")
def manifest(config, source: Source) -> dict:
  """What the store of this run holds: teacher, data, preprocessing, the
  outputs' per-record shapes and dtypes, the logit format, the sharding."""
  dtype = config.teacher.store_dtype
  data = {k: config.data[k] for k in ("tfds_name", "sampling_rate",
                                      "eval_batch_size")}
  data.update(split=config.data.splits["train"],
              records=len(pipeline.source(config.data, "train")),
              class_names=list(config.data.class_names))
  data["transforms"] = ("none (the teacher's own preprocessing)" if source.raw
                        else config.data.transforms.to_dict())
  return json.loads(json.dumps(dict(
      format=FORMAT, teacher=source.identity, data=data,
      outputs={n: [list(shape), dtype] for n, shape in source.outputs.items()},
      logits=f"full {dtype}", shard_batches=SHARD_BATCHES), default=str))


def root_of(config) -> str:
  """Where the run's stores live: config.teacher.store_dir, else beside
  the teacher (<teacher.init>/teacher_store, or the ONNX file's folder)."""
  t = config.teacher
  base = t.store_dir or os.path.join(
      os.path.dirname(t.onnx) if t.onnx else t.init, "teacher_store")
  return os.path.abspath(os.path.expanduser(base))


def _shards(spec) -> int:
  """Shards of a complete store."""
  batches = -(-spec["data"]["records"] // spec["data"]["eval_batch_size"])
  return -(-batches // spec["shard_batches"])


def key(spec) -> str:
  """The store folder of a manifest: a hash of it."""
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()
                        ).hexdigest()[:16]


def location(config, spec) -> str:
  """The folder of the store whose manifest is `spec`."""
  return os.path.join(root_of(config), key(spec))


def build_or_load(config, source: Source, spec=None) -> dict:
  """{"teacher/logits": rows [N, C], "teacher/<tap>": rows [N, ...],
  "id": [N]} of the training split, in its record order: written on first
  use (this process's shards), then read. `spec`: the run's manifest, if
  the caller has it."""
  spec = spec or manifest(config, source)
  root = location(config, spec)
  write(config, source, root, spec, process_index=jax.process_index(),
        process_count=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"teacher_store:{root}")
  return load(root, spec)


def _write_manifest(root, spec):
  """The manifest, written once; an existing one must be `spec`."""
  path = os.path.join(root, "manifest.json")
  if os.path.isfile(path):
    _check_manifest(root, spec)
    return
  os.makedirs(root, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(spec, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _check_manifest(root, spec):
  """ValueError naming the first field where the store and the run differ."""
  with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
    stored = json.load(f)

  def differ(a, b, where):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        found = differ(a.get(k), b.get(k), f"{where}.{k}")
        if found:
          return found
      return None
    return None if a == b else (where, a, b)
  found = differ(stored, spec, "manifest")
  if found:
    raise ValueError(f"{root}/manifest.json: {found[0]} is {found[1]!r}, "
                     f"the run expects {found[2]!r}.")


def _shard_dir(root, index):
  return os.path.join(root, f"shard-{index:05d}")


def write(config, source: Source, root, spec, *, process_index=0,
          process_count=1) -> None:
  """Writes this process's missing shards of the store at `root` (reads
  the split only when one is missing), with a progress bar."""
  _write_manifest(root, spec)
  mine = [i for i in range(process_index, _shards(spec), process_count)
          if not os.path.isdir(_shard_dir(root, i))]
  if not mine:
    return
  dtype = np.dtype(config.teacher.store_dtype)
  pending, current = {}, None
  batches_in = -(-spec["data"]["records"] // spec["data"]["eval_batch_size"])
  bar = tqdm.tqdm(total=sum(min(SHARD_BATCHES, batches_in - i * SHARD_BATCHES)
                            for i in mine), unit="batch",
                  desc="teacher store", leave=False,
                  disable=jax.process_index() > 0)
  for i, batch in enumerate(pipeline.eval_batches(config.data, "train",
                                                  raw=source.raw)):
    shard = i // SHARD_BATCHES
    if shard != current and pending:
      _save_shard(root, current, pending)
      pending = {}
    current = shard
    if shard not in mine:
      continue  # another process's shard, or already written
    out = source.predict(batch["ecg"])
    keep = batch["mask"]
    rows = {n: np.asarray(v)[keep].astype(dtype) for n, v in out.items()}
    rows["ids"] = batch["id"][keep]
    for name, value in rows.items():
      pending.setdefault(name, []).append(value)
    bar.update()
  if pending:
    _save_shard(root, current, pending)
  bar.close()


def _predictor(teacher, taps):
  def fn(params, batch):
    logits, feats = teacher.apply({"params": params}, batch["ecg"], taps=taps)
    return {"logits": logits, **feats}
  return fn


def _save_shard(root, index, pending):
  """Writes one shard to a temporary folder, then renames it into place
  (another writer's complete copy of the same shard is kept)."""
  final = _shard_dir(root, index)
  tmp = tempfile.mkdtemp(dir=root, prefix=".tmp_")
  try:
    for name, chunks in pending.items():
      np.save(os.path.join(tmp, f"{name}.npy"), np.concatenate(chunks))
    try:
      os.replace(tmp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class Rows:
  """Row i of a store output across its shards (memory-mapped): what the
  training pipeline reads per record (`len`, `rows[i]`)."""

  def __init__(self, arrays):
    self._arrays = arrays
    self._starts = np.cumsum([0] + [len(a) for a in arrays])

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, i):
    shard = int(np.searchsorted(self._starts, i, side="right")) - 1
    return self._arrays[shard][i - self._starts[shard]]

  @property
  def shape(self):
    return (len(self),) + self._arrays[0].shape[1:]

  @property
  def dtype(self):
    return self._arrays[0].dtype


def load(root, spec) -> dict:
  """The store at `root` as {"teacher/<output>": Rows, "id": Rows}; checks
  the manifest against `spec` and that no shard is missing."""
  _check_manifest(root, spec)
  shards = sorted(d for d in os.listdir(root) if d.startswith("shard-"))
  want = [os.path.basename(_shard_dir(root, i)) for i in range(_shards(spec))]
  if shards != want:
    missing = sorted(set(want) - set(shards))
    raise ValueError(f"{root}: shards {missing[:3]} of {len(want)} are "
                     "missing (an unfinished write: rerun the same command "
                     "to resume it).")
  names = sorted(n[:-4] for n in os.listdir(os.path.join(root, shards[0]))
                 if n.endswith(".npy"))
  out = {}
  for name in names:
    rows = Rows([np.load(os.path.join(root, d, f"{name}.npy"), mmap_mode="r")
                 for d in shards])
    out["id" if name == "ids" else PREFIX + name] = rows
  return out
