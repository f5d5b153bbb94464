"""The teacher-output store: shards written whole by their processes, a
resumed write equal to an uninterrupted one, the manifest checked by field,
rows joined to the training examples by record id."""

import os

import jax
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import models
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.train import teacher_store

TAPS = ("tokens",)


@pytest.fixture(scope="module")
def setup(tfds_dir):
  config = default.get_config("mode=distill,loss=fitnet,runlocal")
  config.data.data_dir = tfds_dir
  config.teacher.depth = 1
  teacher = models.get(config.teacher, 5)
  example = np.asarray(pipeline.example(config.data)["ecg"])[None]
  params = jax.jit(teacher.init)(jax.random.PRNGKey(0), example)["params"]
  return config, teacher, params


def _arrays(store):
  return {k: np.stack([rows[i] for i in range(len(rows))])
          for k, rows in store.items()}


def test_shards_of_two_writers_and_a_resumed_write_equal_one_write(
    setup, tmp_path, monkeypatch):
  # One eval batch a shard, so that the tiny split has several.
  monkeypatch.setattr(teacher_store, "SHARD_BATCHES", 1)
  config, teacher, params = setup
  source = teacher_store.jax_source(config, teacher, params, TAPS)
  spec = teacher_store.manifest(config, source)
  shards = teacher_store._shards(spec)  # pylint: disable=protected-access
  assert shards >= 3
  write = lambda root, **kw: teacher_store.write(config, source, str(root),
                                                 spec, **kw)
  write(tmp_path / "one")
  one = _arrays(teacher_store.load(str(tmp_path / "one"), spec))
  assert one["id"].shape[0] == spec["data"]["records"]
  assert list(one["teacher/tokens"].shape[1:]) == spec["outputs"]["tokens"][0]
  # Process 0 of 2 writes the even shards: the store is unfinished until
  # process 1 has written the odd ones.
  write(tmp_path / "two", process_index=0, process_count=2)
  assert len(os.listdir(tmp_path / "two")) - 1 == (shards + 1) // 2
  with pytest.raises(ValueError, match="missing .*rerun the same command"):
    teacher_store.load(str(tmp_path / "two"), spec)
  write(tmp_path / "two", process_index=1, process_count=2)
  two = _arrays(teacher_store.load(str(tmp_path / "two"), spec))
  # An interrupted write (a shard lost, a temporary folder left) resumes.
  os.rename(tmp_path / "one" / "shard-00001", tmp_path / "one" / ".tmp_x")
  write(tmp_path / "one")
  resumed = _arrays(teacher_store.load(str(tmp_path / "one"), spec))
  for name in one:
    np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    np.testing.assert_array_equal(resumed[name], one[name], err_msg=name)


def test_a_store_of_another_run_is_refused_by_field(setup, tmp_path):
  config, teacher, params = setup
  source = lambda p=params, taps=TAPS: teacher_store.jax_source(
      setup[0], teacher, p, taps)
  spec = teacher_store.manifest(config, source())
  teacher_store.write(config, source(), str(tmp_path), spec)
  config = config.copy_and_resolve_references()
  config.data.transforms.bandpass_hz = (0.5, 40.0)
  other = teacher_store.manifest(config, source())
  with pytest.raises(ValueError, match=r"manifest.json: manifest.data."
                     r"transforms.bandpass_hz is \[\], the run expects "
                     r"\[0.5, 40.0\]"):
    teacher_store.load(str(tmp_path), other)
  moved = jax.tree.map(lambda x: x + 1e-3, params)
  with pytest.raises(ValueError, match="manifest.teacher.params_sha256"):
    teacher_store.load(str(tmp_path), teacher_store.manifest(
        setup[0], source(moved)))
  more = source(taps=("tokens", "pooled"))
  with pytest.raises(ValueError, match=r"manifest\.outputs\.pooled"):
    teacher_store.write(setup[0], more, str(tmp_path),
                        teacher_store.manifest(setup[0], more))


def test_rows_join_the_examples_by_record_id(setup, tmp_path):
  config, teacher, params = setup
  source = teacher_store.jax_source(config, teacher, params, TAPS)
  spec = teacher_store.manifest(config, source)
  teacher_store.write(config, source, str(tmp_path), spec)
  store = teacher_store.load(str(tmp_path), spec)
  batch = next(pipeline.train_iterator(config.data, per_record=store))
  rows = {int(i): r for i, r in zip(_arrays(store)["id"],
                                    _arrays(store)["teacher/logits"])}
  np.testing.assert_array_equal(
      batch["teacher/logits"], np.stack([rows[int(i)] for i in batch["id"]]))
  # Rows of another order are an error naming the record, not a silent
  # pairing of one record with another's teacher.
  swapped = dict(store, id=teacher_store.Rows(
      [np.roll(_arrays(store)["id"], 1)]))
  with pytest.raises(ValueError, match=r"Training record .* the per-record "
                     "rows there are record"):
    next(pipeline.train_iterator(config.data, per_record=swapped))


def test_a_float16_store_and_the_kd_loss_it_gives(setup, tmp_path):
  """float16 rows are the float32 rows rounded; the multi-label KD loss
  from them moves by no more than its first-order bound (docs/teachers.md):
  with a = t/T, b = s/T and |Δt| ≤ 2⁻¹¹|t| (float16 rounding),
  |ΔL| ≤ (T/4) · mean_bc (|a − b| + |Δt|/T) · |Δt|, since
  ∂L/∂t = T · σ'(a)(a − b) / (B·C) and σ' ≤ 1/4."""
  config, teacher, params = setup
  stores = {}
  for dtype in ("float32", "float16"):
    config = config.copy_and_resolve_references()
    config.teacher.store_dtype = dtype
    source = teacher_store.jax_source(config, teacher, params, TAPS)
    spec = teacher_store.manifest(config, source)
    assert spec["outputs"]["logits"][1] == dtype
    teacher_store.write(config, source, str(tmp_path / dtype), spec)
    stores[dtype] = _arrays(teacher_store.load(str(tmp_path / dtype), spec))
  for name in stores["float32"]:
    np.testing.assert_array_equal(
        stores["float16"][name],
        stores["float32"][name].astype(stores["float16"][name].dtype))
  from evl_ecg_jax import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # The stored logits of an untrained teacher are small: scale them to a
  # trained teacher's range, where float16's rounding is largest.
  t32 = stores["float32"]["teacher/logits"].astype(np.float64)
  t32 = (8 * t32 / np.abs(t32).max()).astype(np.float32)
  t16 = t32.astype(np.float16).astype(np.float32)
  s = rng.normal(scale=4, size=t32.shape).astype(np.float32)
  for temperature in (1.0, 2.0, 4.0):
    kd = lambda t: float(losses.logit_kd_loss(t, s, temperature=temperature))
    dt = np.abs(t16.astype(np.float64) - t32)
    assert dt.max() <= 2**-11 * np.abs(t32).max()
    a, b = t32 / temperature, s / temperature
    bound = temperature / 4 * np.mean((np.abs(a - b) + dt / temperature) * dt)
    change = abs(kd(t16) - kd(t32))
    assert change <= bound + 1e-6, (temperature, change, bound)
    assert bound < 1e-3 * kd(t32)  # the bound says something
