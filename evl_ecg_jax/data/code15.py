"""CODE-15% (Ribeiro et al. 2020/2021) in its official layout.

`exams.csv` (one row per exam: exam_id, age, is_male, the six labels 1dAVb,
RBBB, LBBB, SB, ST, AF, patient_id, trace_file, ...) and `exams_part*.hdf5`,
each with `tracings` [N, 4096, 12] float32 (400 Hz, leads DI, DII, DIII,
aVR, aVL, aVF, V1-V6; shorter recordings zero-padded at both ends by the
dataset) and `exam_id` [N]; a row with exam_id 0 is padding. No TFDS here
(`builders/code15.py` is a thin layer over it).

There is no official split: `patient_split` assigns every patient (so every
exam of that patient) to train, validation or test from a hash of its id,
so no patient is in two splits and the assignment does not depend on which
parts were downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import os

import numpy as np

CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")
SAMPLING_RATE = 400
SAMPLES = 4096
COLUMNS = ("exam_id", "age", "is_male", "patient_id", "trace_file") + CLASSES
SPLIT_FRACTIONS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


class BadRecord(ValueError):
  """An exam that cannot be used; the message names it and why."""


def read_exams(root: str) -> dict[int, dict]:
  """{exam_id: row} of exams.csv; errors name the file and the problem."""
  path = os.path.join(root, "exams.csv")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (expected the CODE-15% "
                            "layout: exams.csv and exams_part*.hdf5).")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}.")
    exams = {}
    for row in reader:
      exam_id = int(row["exam_id"])
      if exam_id in exams:
        raise ValueError(f"{path}: exam_id {exam_id} appears twice.")
      exams[exam_id] = row
  return exams


def labels(row) -> np.ndarray:
  """Multi-hot float32 [6] from the CSV's 'True'/'False' label columns."""
  def flag(value):
    value = value.strip().lower()
    if value not in ("true", "false", "1", "0"):
      raise BadRecord(f"exam_id {row['exam_id']}: label value {value!r}, "
                      "expected True/False.")
    return value in ("true", "1")
  return np.asarray([flag(row[c]) for c in CLASSES], np.float32)


def patient_split(patient_id: str) -> str:
  """train / validation / test for a patient, from a hash of its id."""
  digest = hashlib.sha256(str(patient_id).encode()).digest()
  u = int.from_bytes(digest[:8], "little") / 2.0**64
  edge = 0.0
  for name, fraction in SPLIT_FRACTIONS:
    edge += fraction
    if u < edge:
      return name
  return SPLIT_FRACTIONS[-1][0]


def tracing_files(root: str) -> list[str]:
  return sorted(os.path.join(root, f) for f in os.listdir(root)
                if f.startswith("exams_part") and f.endswith(".hdf5"))


def iter_tracings(path: str):
  """Yields (exam_id, tracing [4096, 12] float32) of one part, padding skipped."""
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(path, "r") as f:
      ids, tracings = f["exam_id"], f["tracings"]
      if tracings.shape[1:] != (SAMPLES, 12) or len(ids) != len(tracings):
        raise BadRecord(f"{path}: tracings {tracings.shape} and exam_id "
                        f"{ids.shape}, expected [N, {SAMPLES}, 12] and [N].")
      for i, exam_id in enumerate(ids[:]):
        if exam_id:
          yield int(exam_id), np.asarray(tracings[i], np.float32)
  except (OSError, KeyError) as e:
    raise BadRecord(f"{path}: unreadable CODE-15% part: {e}") from None
