"""The code15 builder on a small file written in CODE-15%'s official schema.

No real CODE-15% file is available here, so the test writes exams.csv and an
exams_part0.hdf5 (tracings [N, 4096, 12], exam_id [N], a trailing padding row
with exam_id 0) the way the dataset ships them.
"""

import csv

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from evl_ecg_jax.data import code15
from evl_ecg_jax.data.builders import code15 as code15_builder

FIELDS = ["exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB",
          "LBBB", "SB", "ST", "AF", "patient_id", "death", "timey",
          "normal_ecg", "trace_file"]


def _write(root, n=40, orphan=False, nan_exam=None, drop_column=None):
  rng = np.random.default_rng(0)
  root.mkdir(exist_ok=True)
  ids = np.arange(1001, 1001 + n)
  patients = 500 + ids % 17  # several exams per patient
  hot = rng.random((n, 6)) < 0.2
  fields = [f for f in FIELDS if f != drop_column]
  with open(root / "exams.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for i, exam in enumerate(ids):
      row = dict(exam_id=exam, age=40 + i, is_male=str(i % 2 == 0),
                 nn_predicted_age=50.0, patient_id=patients[i], death="",
                 timey="", normal_ecg="False",
                 trace_file="exams_part0.hdf5",
                 **{c: str(bool(h)) for c, h in zip(code15.CLASSES, hot[i])})
      writer.writerow({k: v for k, v in row.items() if k in fields})
  tracings = rng.normal(size=(n + 1, 4096, 12)).astype(np.float32)
  tracings[-1] = 0.0
  h5_ids = np.append(ids, 0)  # padding row
  if orphan:
    h5_ids[0] = 99999
  if nan_exam is not None:
    tracings[nan_exam, 100, 3] = np.nan
  with h5py.File(root / "exams_part0.hdf5", "w") as f:
    f["tracings"] = tracings
    f["exam_id"] = h5_ids
  return ids, patients, hot, tracings


def _build(root, data_dir, **config):
  cfg = code15_builder.Code15Config(name="custom", **config) if config else (
      "400hz")
  builder = tfds.builder("code15", config=cfg, data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root)))
  return builder


def test_builds_patient_disjoint_splits_with_the_csv_labels(tmp_path):
  ids, patients, hot, tracings = _write(tmp_path / "code15")
  builder = _build(tmp_path / "code15", tmp_path / "tfds")
  split_of = {p: code15.patient_split(str(p)) for p in set(patients)}
  expected = {s: sum(split_of[p] == s for p in patients)
              for s in ("train", "validation", "test")}
  got = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert got == {k: v for k, v in expected.items() if v}
  assert sum(got.values()) == len(ids)  # the padding row is not an exam
  seen_patients = {}
  for split in got:
    source = tfds.data_source("code15", split=split, data_dir=str(
        tmp_path / "tfds"), builder_kwargs={"file_format": "array_record"})
    for ex in source:
      i = int(ex["id"]) - 1001
      np.testing.assert_array_equal(ex["labels"], hot[i].astype(np.float32))
      np.testing.assert_array_equal(ex["ecg"], tracings[i])
      assert ex["sex"] == (0 if i % 2 == 0 else 1)
      assert seen_patients.setdefault(int(ex["patient_id"]), split) == split


def test_patient_split_is_stable_and_near_its_fractions():
  assert code15.patient_split("123") == code15.patient_split("123")
  names = [code15.patient_split(str(p)) for p in range(20000)]
  for name, fraction in code15.SPLIT_FRACTIONS:
    assert abs(names.count(name) / 20000 - fraction) < 0.01


def test_bad_exams_are_named_or_skipped_and_counted(tmp_path):
  _write(tmp_path / "orphan", orphan=True)
  with pytest.raises(code15.BadRecord, match="exam_id 99999 .*no row"):
    _build(tmp_path / "orphan", tmp_path / "t1")
  _write(tmp_path / "nan", nan_exam=5)
  with pytest.raises(code15.BadRecord, match="exam_id 1006: NaN"):
    _build(tmp_path / "nan", tmp_path / "t2")
  builder = _build(tmp_path / "nan", tmp_path / "t3", skip_bad_records=True)
  counts = builder.info.metadata["build_counts"]
  assert sum(c.get("skipped", 0) for c in counts.values()) == 1
  assert sum(v.num_examples for v in builder.info.splits.values()) == 39
  _write(tmp_path / "nocol", drop_column="RBBB")
  with pytest.raises(ValueError, match=r"exams.csv: missing column.*RBBB"):
    code15.read_exams(str(tmp_path / "nocol"))
