"""Frozen-teacher outputs for a training split, computed once and memory-mapped.

A distillation sweep runs the same frozen teacher over the same records in
every run. With `config.teacher.cache_features`, its logits and the feature
taps the objective reads are written once per (teacher, data, taps) under
the teacher's workdir, `feature_cache/<key>/` (one `.npy` per output, rows
in the split's record order, plus the record ids), and the training
pipeline attaches each record's rows to its example; the train step then
skips the teacher forward. The cache is written to a temporary folder and
renamed into place, so a partial cache is never read.

Augmentations change the input the teacher would see, so a cached teacher
would be answering for another signal: caching with augmentations on is
refused (deterministic preprocessing is fine: it is applied before the
teacher, exactly as in training).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from absl import logging
import jax
import numpy as np

from evl_ecg_jax import parallel
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.data import transforms

PREFIX = "teacher/"


def _key(config, taps) -> str:
  spec = dict(data={k: config.data[k] for k in (
      "tfds_name", "splits", "sampling_rate", "transforms")},
              teacher=dict(config.teacher), taps=list(taps))
  spec["teacher"].pop("init", None)
  text = json.dumps(spec, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check(config) -> None:
  """Raises ValueError naming the field when caching cannot be honest."""
  if transforms.make_augment(config.data.transforms,
                             config.data.sampling_rate) is not None:
    raise ValueError(
        "config.teacher.cache_features=True with training augmentations on "
        "(config.data.transforms: scale / baseline_wander / noise_std / "
        "lead_dropout): the cached teacher would answer for the "
        "un-augmented signal. Turn one of them off.")


def _teacher_outputs(teacher, params, taps):
  def fn(params, batch):
    logits, feats = teacher.apply({"params": params}, batch["ecg"], taps=taps)
    return {"logits": logits, **feats}
  return parallel.pmap_predict(fn)


def build_or_load(config, teacher, teacher_params, taps) -> dict:
  """{"teacher/logits": memmap [N, C], "teacher/<tap>": memmap [N, ...]}.

  Builds the cache on first use (process 0 of a single-host run), then
  memory-maps it. Rows follow the training split's record order.
  """
  root = os.path.join(os.path.abspath(os.path.expanduser(
      config.teacher.init)), "feature_cache", _key(config, taps))
  if not os.path.isdir(root):
    _build(config, teacher, teacher_params, taps, root)
  with open(os.path.join(root, "index.json"), encoding="utf-8") as f:
    names = json.load(f)["outputs"]
  return {PREFIX + n: np.load(os.path.join(root, f"{n}.npy"), mmap_mode="r")
          for n in names}


def _build(config, teacher, teacher_params, taps, root):
  logging.info("Caching teacher outputs (taps %s) in %s", taps, root)
  n_dev = jax.local_device_count()
  predict = _teacher_outputs(teacher, teacher_params, tuple(taps))
  outputs, ids = {}, []
  for batch in pipeline.eval_batches(config.data, "train"):
    out = predict(teacher_params, parallel.split_batch(
        {"ecg": batch["ecg"]}, n_dev))
    keep = batch["mask"]
    for name, value in out.items():
      outputs.setdefault(name, []).append(
          parallel.merge_outputs(value)[keep].astype(np.float32))
    ids.append(batch["id"][keep])
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(root), prefix=".tmp_")
  try:
    for name, chunks in outputs.items():
      np.save(os.path.join(tmp, f"{name}.npy"), np.concatenate(chunks))
    np.save(os.path.join(tmp, "ids.npy"), np.concatenate(ids))
    with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
      json.dump({"outputs": sorted(outputs), "taps": list(taps)}, f)
    try:
      os.replace(tmp, root)
    except OSError:
      # Another run of a sweep built the same cache (same key) meanwhile:
      # keep that complete one, drop ours.
      if not os.path.isfile(os.path.join(root, "index.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
