"""The grain training pipeline: determinism, resumable state, process shards."""

import gc
import itertools

import ml_collections
import numpy as np
import pytest

from evl_ecg_jax.data import pipeline

NUM_TRAIN = 128  # synthetic_ecg/tiny


def _cfg(tfds_dir, batch_size=8, seed=0):
  return ml_collections.ConfigDict(dict(
      tfds_name="synthetic_ecg/tiny", data_dir=tfds_dir, manual_dir="",
      splits=dict(train="train"), batch_size=batch_size, shuffle_seed=seed,
      prefetch_threads=2, worker_processes=0, sampling_rate=100,
      transforms=dict(
          bandpass_hz=(), standardize=False, resample_hz=0, scale=0.0,
          baseline_wander=0.0, noise_std=0.0, lead_dropout=0.0)))


def _ids(iterator, n):
  return [b["id"].tolist() for b in itertools.islice(iterator, n)]


def test_same_seed_same_batches_other_seed_other_batches(tfds_dir):
  a = _ids(pipeline.train_iterator(_cfg(tfds_dir)), 5)
  b = _ids(pipeline.train_iterator(_cfg(tfds_dir)), 5)
  c = _ids(pipeline.train_iterator(_cfg(tfds_dir, seed=1)), 5)
  assert a == b and a != c


def test_in_memory_records_give_the_same_resumable_batches(tfds_dir):
  cfg = _cfg(tfds_dir)
  cfg.label_fraction, cfg.label_seed = 0.25, 0  # the mask compares too
  expected = list(itertools.islice(pipeline.train_iterator(cfg), 6))
  cfg.in_memory = True
  it = pipeline.train_iterator(cfg)
  got = list(itertools.islice(it, 3))
  state = it.get_state()
  resumed = pipeline.train_iterator(cfg)
  resumed.set_state(state)
  got += list(itertools.islice(resumed, 3))
  assert "label_mask" in expected[0]
  for want, have in zip(expected, got):
    for key in want:
      np.testing.assert_array_equal(have[key], want[key])


def test_restored_state_gives_the_same_next_batches(tfds_dir):
  it = pipeline.train_iterator(_cfg(tfds_dir))
  _ids(it, 7)
  state = it.get_state()
  expected = [dict(b) for b in itertools.islice(it, 4)]
  resumed = pipeline.train_iterator(_cfg(tfds_dir))
  resumed.set_state(state)
  for want, got in zip(expected, itertools.islice(resumed, 4)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_process_shards_tile_the_single_process_batches(tfds_dir):
  """P processes together read exactly the global batches of one process.

  Process p holds rows [p·b, (p + 1)·b) of each global batch (the rows of
  its devices), so a run's batches do not depend on the process count.
  Every epoch is a permutation of the records, reshuffled each epoch.
  """
  global_batch, processes = 8, 4
  steps = 2 * NUM_TRAIN // global_batch + 3  # crosses two epoch boundaries
  cfg = _cfg(tfds_dir, batch_size=global_batch)
  cfg.transforms.update(noise_std=0.05)  # augmentations follow the rows
  whole = list(itertools.islice(pipeline.train_iterator(cfg), steps))
  shards = [list(itertools.islice(pipeline.train_iterator(
      cfg, process_index=p, process_count=processes), steps))
            for p in range(processes)]
  for k, batch in enumerate(whole):
    for key in ("id", "ecg", "labels"):
      np.testing.assert_array_equal(
          np.concatenate([shard[k][key] for shard in shards]), batch[key])
  ids = np.concatenate([b["id"] for b in whole])
  epoch0, epoch1 = ids[:NUM_TRAIN], ids[NUM_TRAIN:2 * NUM_TRAIN]
  assert sorted(epoch0) == sorted(epoch1) == sorted(set(epoch0))
  assert len(set(epoch0)) == NUM_TRAIN and list(epoch0) != list(epoch1)


def test_augmented_stream_is_deterministic_and_resumable(tfds_dir):
  cfg = _cfg(tfds_dir)
  cfg.transforms.update(dict(bandpass_hz=(0.5, 40.0), standardize=True,
                             scale=0.1, noise_std=0.05, lead_dropout=0.1))
  raw = next(pipeline.train_iterator(_cfg(tfds_dir)))["ecg"]
  first = pipeline.train_iterator(cfg)
  a = [b["ecg"] for b in itertools.islice(first, 3)]
  state = first.get_state()
  after = next(first)["ecg"]
  again = pipeline.train_iterator(cfg)
  for want, got in zip(a, itertools.islice(again, 3)):
    np.testing.assert_array_equal(got["ecg"], want)
  again = pipeline.train_iterator(cfg)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["ecg"], after)
  assert not np.allclose(a[0], raw)  # the transforms ran
  # Standardised, then scaled by at most 1.1 (plus noise): bounded spread.
  assert 0.7 < float(np.std(a[0])) < 1.3


def test_worker_processes_give_the_same_resumable_stream(tfds_dir):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # grain reads absl flags; app.run parses
    flags.FLAGS.mark_as_parsed()
  cfg = _cfg(tfds_dir)
  cfg.transforms.update(dict(standardize=True, noise_std=0.05))
  threads = [b["ecg"] for b in itertools.islice(
      pipeline.train_iterator(cfg), 4)]
  cfg.worker_processes = 2
  workers = pipeline.train_iterator(cfg)
  first = [b["ecg"] for b in itertools.islice(workers, 2)]
  state = workers.get_state()
  rest = [b["ecg"] for b in itertools.islice(workers, 2)]
  resumed = pipeline.train_iterator(cfg)
  resumed.set_state(state)
  again = [b["ecg"] for b in itertools.islice(resumed, 2)]
  del workers, resumed  # stop the worker processes before the next test
  gc.collect()
  for want, got in zip(threads, first + rest):
    np.testing.assert_array_equal(got, want)
  for want, got in zip(rest, again):
    np.testing.assert_array_equal(got, want)


def test_resample_transform_changes_the_rate_of_train_and_eval(tfds_dir):
  cfg = _cfg(tfds_dir)
  cfg.transforms.resample_hz = 50
  assert next(pipeline.train_iterator(cfg))["ecg"].shape == (8, 500, 12)
  cfg.eval_batch_size = 16
  cfg.splits.test = "test"
  batch = next(pipeline.eval_batches(cfg, "test"))
  assert batch["ecg"].shape == (16, 500, 12)


def test_labelled_subset_is_stratified_seeded_and_exact():
  rng = np.random.default_rng(0)
  labels = (rng.random((1000, 5)) < [0.5, 0.15, 0.3, 0.25, 0.1]).astype(
      np.float32)
  mask = pipeline.labelled_subset(labels, 0.1, seed=3)
  assert mask.sum() == 100
  np.testing.assert_array_equal(mask, pipeline.labelled_subset(labels, 0.1, 3))
  assert (mask != pipeline.labelled_subset(labels, 0.1, 4)).any()
  # Every label set keeps its share: floor or ceil of 10 % of its records.
  keys = [row.tobytes() for row in labels > 0.5]
  for key in set(keys):
    members = np.asarray([k == key for k in keys])
    share = 0.1 * members.sum()
    assert np.floor(share) <= mask[members].sum() <= np.ceil(share)
  # Per class, the labelled prevalence is close to the full one.
  np.testing.assert_allclose(labels[mask].mean(0), labels.mean(0), atol=0.03)
  assert pipeline.labelled_subset(labels, 1.0, 0).all()
  with pytest.raises(ValueError, match="label_fraction=0.0"):
    pipeline.labelled_subset(labels, 0.0, 0)


def test_train_batches_carry_the_label_mask(tfds_dir):
  cfg = _cfg(tfds_dir)
  cfg.label_fraction, cfg.label_seed = 0.25, 0
  epoch = list(itertools.islice(pipeline.train_iterator(cfg), NUM_TRAIN // 8))
  ids = np.concatenate([b["id"] for b in epoch])
  masks = np.concatenate([b["label_mask"] for b in epoch])
  assert len(set(ids.tolist())) == NUM_TRAIN and masks.sum() == NUM_TRAIN // 4
  # The same records are labelled in the next epoch (fixed per record).
  nxt = list(itertools.islice(pipeline.train_iterator(cfg), 2 * NUM_TRAIN // 8))
  again = {int(i): bool(m) for b in nxt[NUM_TRAIN // 8:]
           for i, m in zip(b["id"], b["label_mask"])}
  assert again == {int(i): bool(m) for i, m in zip(ids, masks)}
  # ... and they are the stratified subset of the split's labels, in order.
  src = pipeline.source(cfg, "train")
  expected = pipeline.labelled_subset(
      np.stack([src[k]["labels"] for k in range(len(src))]), 0.25, 0)
  assert again == {int(src[k]["id"]): bool(expected[k])
                   for k in range(len(src))}
  assert "label_mask" not in next(pipeline.train_iterator(_cfg(tfds_dir)))
