"""grain input pipelines over TFDS array_record sources.

Training: source (+ "label_mask" when only `label_fraction` of the records
keep their labels) -> seeded shuffle, reshuffled each epoch -> infinite
repeat -> preprocessing -> seeded augmentations -> host batches, of which
this process reads its share of each global batch. The iterator is checkpointable
(`get_state`/`set_state`), so a resumed run sees the same batches.
Evaluation: this process's shard in order, final batch padded with a mask.
"""

from __future__ import annotations

import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from evl_ecg_jax.data import builders  # noqa: F401  (registers builders)
from evl_ecg_jax.data import transforms

FEATURES = ("ecg", "labels", "id")
PREFETCH_BATCHES = 4  # batches read ahead by the training iterator


def _path(path: str) -> str | None:
  return os.path.abspath(os.path.expanduser(path)) if path else None


def source(data_cfg, split: str):
  """Random-access TFDS source of logical `split` (train, validation, test).

  `data_cfg.splits[split]` names the TFDS split (PTB-XL: a sum of folds).
  Prepares the dataset on first use, from `data_cfg.manual_dir` for real data.
  """
  if split not in data_cfg.splits:
    raise ValueError(f"config.data.splits has no {split!r} entry; it maps "
                     f"{sorted(data_cfg.splits)}.")
  spec = data_cfg.splits[split]
  prepare = {}
  if data_cfg.manual_dir:
    prepare = {"download_config": tfds.download.DownloadConfig(
        manual_dir=_path(data_cfg.manual_dir))}
  try:
    return tfds.data_source(data_cfg.tfds_name, split=spec,
                            data_dir=_path(data_cfg.data_dir),
                            builder_kwargs={"file_format": "array_record"},
                            download_and_prepare_kwargs=prepare)
  except (ValueError, KeyError) as e:
    if "split" not in str(e).lower():
      raise
    raise ValueError(
        f"config.data.splits.{split}={spec!r}: {data_cfg.tfds_name} has no "
        f"such split(s) ({e}). A PTB-XL subset without fold 10 needs "
        "folds=shared (train 1-7, validation 8, test 9) or explicit "
        "--config.data.splits.* overrides.") from None


def example(data_cfg) -> dict:
  """First training record, checked against `data_cfg.class_names`."""
  record = _select(source(data_cfg, "train")[0])
  num_labels = record["labels"].shape[-1]
  if num_labels != len(data_cfg.class_names):
    raise ValueError(
        f"config.data.class_names has {len(data_cfg.class_names)} names but "
        f"{data_cfg.tfds_name} has {num_labels} labels per record.")
  return record


def _select(example):
  return {k: example[k] for k in FEATURES}


def host_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"Global batch {global_batch} does not split over "
                     f"{process_count} processes.")
  return global_batch // process_count


def labelled_subset(labels: np.ndarray, fraction: float,
                    seed: int) -> np.ndarray:
  """bool [N]: a seeded subset of round(fraction·N) records, stratified.

  Records are grouped by their label set (e.g. {MI, CD}); each group gives
  floor(fraction·n) records, and the remaining ones go to the groups with
  the largest remainders (ties: larger group first), so every label
  combination keeps its share as closely as whole records allow.
  """
  labels = np.asarray(labels) > 0.5
  n = len(labels)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"config.data.label_fraction={fraction}: expected a "
                     "fraction in (0, 1].")
  groups = {}
  for i, row in enumerate(labels):
    groups.setdefault(row.tobytes(), []).append(i)
  keys = sorted(groups)
  quota = {k: fraction * len(groups[k]) for k in keys}
  take = {k: int(np.floor(q)) for k, q in quota.items()}
  spare = int(round(fraction * n)) - sum(take.values())
  order = sorted(keys, key=lambda k: (-(quota[k] - take[k]),
                                      -len(groups[k]), k))
  for k in order[:spare]:
    take[k] += 1
  rng = np.random.default_rng(seed)
  mask = np.zeros(n, bool)
  for k in keys:
    members = np.asarray(groups[k])
    mask[rng.permutation(members)[:take[k]]] = True
  return mask


def _label_mask(data_cfg, train_source):
  """label_mask of every training record, or None when all are labelled."""
  fraction = data_cfg.get("label_fraction", 1.0)
  if fraction >= 1.0:
    return None
  labels = np.stack([train_source[i]["labels"]
                     for i in range(len(train_source))])
  return labelled_subset(labels, fraction, data_cfg.label_seed)


def _preprocessed(ds, data_cfg):
  """Maps the deterministic preprocessing of `data_cfg.transforms`, if any."""
  fn = transforms.make_preprocess(data_cfg.transforms, data_cfg.sampling_rate)
  if fn is None:
    return ds
  return ds.map(lambda ex: dict(ex, ecg=fn(ex["ecg"])))


_IN_MEMORY: dict = {}  # (tfds name, data dir, split spec) -> records


def _train_records(data_cfg, train):
  """The training records, read from the source on every access, or
  (data.in_memory) decoded once per process and kept: the same records in
  the same order, so the same batches. For many short runs over a small
  dataset (benchmarks/kd_table.py), where decoding the array_record source
  costs more CPU than the training steps. Returns (records to index for
  per-record data such as labels, the grain MapDataset of them)."""
  if not data_cfg.get("in_memory", False):
    return train, grain.MapDataset.source(train).map(_select)
  key = (data_cfg.tfds_name, _path(data_cfg.data_dir),
         data_cfg.splits["train"])
  if key not in _IN_MEMORY:
    _IN_MEMORY.clear()  # one split at a time
    _IN_MEMORY[key] = [_select(train[i]) for i in range(len(train))]
  return _IN_MEMORY[key], grain.MapDataset.source(_IN_MEMORY[key])


def _joined(example, ids, row):
  """`example` once its record id is row `row` of `ids` (None: no check)."""
  if ids is not None and not np.array_equal(ids[row], example["id"]):
    raise ValueError(f"Training record {example['id']!r} (position {row}): "
                     f"the per-record rows there are record {ids[row]!r}; "
                     "they were written for another order or split.")
  return example


def train_iterator(data_cfg, *, process_index=0, process_count=1,
                   read_threads=None, per_record=None):
  """Infinite, checkpointable iterator of host-local training batches.

  Reads with `prefetch_threads` threads, and with `worker_processes` > 0
  in that many grain worker processes (same stream, same state).

  Augmentations draw from a generator seeded by `shuffle_seed` and the
  example's position in the stream, so a restored iterator repeats them.
  `per_record` ({key: rows [N, ...]} in the split's record order, e.g. the
  teacher-output store's) adds row i of each to record i; its "id" rows,
  if given, must be the records' ids (ValueError naming the record).
  """
  batch = host_batch_size(data_cfg.batch_size, process_count)
  train = source(data_cfg, "train")
  # The labels protocol's mask reads the records kept in memory, if any,
  # instead of decoding the split once more.
  records, ds = _train_records(data_cfg, train)
  extra = dict(per_record or {})
  ids = extra.pop("id", None)
  mask = _label_mask(data_cfg, records)
  if mask is not None:
    extra["label_mask"] = mask
  for key, rows in extra.items():
    if len(rows) != len(train):
      raise ValueError(f"{key}: {len(rows)} rows for the {len(train)} "
                       "training records.")
  if extra:
    # By position in the whole split, before sharding; grain hands later
    # epochs' positions on unreduced (i + epoch·N), hence the modulo.
    n = len(train)
    ds = ds.map_with_index(lambda i, ex: dict(_joined(ex, ids, i % n), **{
        k: np.asarray(v[i % n]) for k, v in extra.items()}))
  ds = _preprocessed(ds.shuffle(seed=data_cfg.shuffle_seed).repeat(),
                     data_cfg)
  augment = transforms.make_augment(data_cfg.transforms,
                                    data_cfg.sampling_rate)
  if augment is not None:
    ds = ds.random_map(lambda ex, rng: dict(ex, ecg=augment(ex["ecg"], rng)),
                       seed=data_cfg.shuffle_seed)
  # Global batch k is host batches k·P .. k·P + P - 1 of one shuffled
  # stream: process p reads (lazily, only its own records) rows
  # [p·b, (p + 1)·b) of every global batch, the rows its devices hold, so
  # any process count trains on the same global batches, augmentations
  # included (tests/train/multiprocess_test.py).
  ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
  threads = data_cfg.prefetch_threads if read_threads is None else read_threads
  # The buffer counts elements of this dataset, i.e. whole batches.
  options = grain.ReadOptions(num_threads=threads,
                              prefetch_buffer_size=PREFETCH_BATCHES)
  ds = ds.to_iter_dataset(options)
  if data_cfg.worker_processes:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.worker_processes))
  return iter(ds)


def _records(data_cfg, split: str, raw: bool = False):
  """The split's records in order, preprocessed unless `raw` (a grain
  MapDataset)."""
  ds = grain.MapDataset.source(source(data_cfg, split)).map(_select)
  return ds if raw else _preprocessed(ds, data_cfg)


def _stack(records) -> dict:
  return {k: np.stack([r[k] for r in records]) for k in FEATURES}


def split_records(data_cfg, split: str, limit: int = 0,
                  raw: bool = False) -> dict:
  """The first `limit` records of `split` (0: all), preprocessed as for
  evaluation unless `raw`: {"ecg": [N, T, L], "labels": [N, C], "id": [N]}."""
  ds = _records(data_cfg, split, raw)
  n = min(limit, len(ds)) if limit else len(ds)
  return _stack([ds[i] for i in range(n)])


def sample(data_cfg, split: str, n: int, seed: int) -> dict:
  """`n` records of `split` drawn without replacement (seeded), preprocessed
  as for evaluation (as `split_records`).

  E.g. the calibration set of int8 quantisation (evl_ecg_jax.export). All
  records when the split has at most `n`.
  """
  ds = _records(data_cfg, split)
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(len(ds), min(n, len(ds)), replace=False))
  return _stack([ds[int(i)] for i in rows])


def _pad(batch, size: int):
  """Pads a final short batch to `size` rows; adds "mask" (True = real row)."""
  n = len(batch["id"])
  pad = lambda x: np.concatenate([x, np.zeros((size - n,) + x.shape[1:],
                                               x.dtype)])
  out = {k: pad(v) for k, v in batch.items()}
  out["mask"] = np.arange(size) < n
  return out


def eval_batches(data_cfg, split: str, *, process_index=0, process_count=1,
                 raw=False):
  """Yields every example of this process's shard once, in padded batches
  (`raw`: the records as stored, without config.data.transforms)."""
  batch = host_batch_size(data_cfg.eval_batch_size, process_count)
  ds = _records(data_cfg, split, raw)[process_index::process_count].batch(
      batch)
  for b in ds:
    yield _pad(b, batch)
