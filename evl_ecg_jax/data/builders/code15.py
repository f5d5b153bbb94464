"""TFDS builder `code15` over CODE-15% in its official layout (manual_dir).

manual_dir holds `exams.csv` and the `exams_part*.hdf5` files (any subset of
the 18 parts). Splits train / validation / test (80 / 10 / 10 %) are by
patient (`evl_ecg_jax.data.code15.patient_split`). Tracings stay at 400 Hz,
4096 samples. An exam in an hdf5 part without a row in exams.csv, an
unreadable part, bad label values or non-finite samples stop the build with
the exam's id, or with `skip_bad_records` are skipped and counted per split
in the metadata (`build_counts`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from evl_ecg_jax.data import code15
from evl_ecg_jax.data.builders import _base


@dataclasses.dataclass
class Code15Config(tfds.core.BuilderConfig):
  """The bad-record policy."""
  skip_bad_records: bool = False


def _float(value: str) -> float:
  return float(value) if value.strip() else float("nan")


class Code15(_base.ArrayRecordBuilder):
  """CODE-15%: 12-lead ECGs (400 Hz) with six abnormality labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [Code15Config(name="400hz", description="400 Hz.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download CODE-15% from Zenodo (record 4916206) and set manual_dir "
      "(config.data.manual_dir) to the folder holding exams.csv and "
      "exams_part*.hdf5.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=("CODE-15% 12-lead ECGs at 400 Hz (4096 samples), "
                     f"labels {', '.join(code15.CLASSES)}."),
        features=_base.ecg_features(code15.SAMPLES, len(code15.CLASSES),
                                    patient_id=_base.int_feature()),
        supervised_keys=("ecg", "labels"),
        homepage="https://doi.org/10.5281/zenodo.4916206",
        metadata=tfds.core.MetadataDict(
            classes=list(code15.CLASSES),
            sampling_rate=code15.SAMPLING_RATE),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    """Splits that receive at least one exam of the parts present."""
    root = str(dl_manager.manual_dir)
    exams = code15.read_exams(root)
    parts = code15.tracing_files(root)
    if not parts:
      raise FileNotFoundError(f"{root}: no exams_part*.hdf5 files.")
    present = collections.Counter()
    for row in exams.values():
      present[code15.patient_split(row["patient_id"])] += 1
    self._counts = collections.defaultdict(collections.Counter)
    return {split: self._generate_examples(exams, parts, split)
            for split, _ in code15.SPLIT_FRACTIONS if present[split]}

  def _generate_examples(self, exams, parts, split):
    """Yields (exam_id, example) of `split` from every part."""
    counts = self._counts[split]
    for path in parts:
      for exam_id, tracing in code15.iter_tracings(path):
        row = exams.get(exam_id)
        try:
          if row is None:
            raise code15.BadRecord(f"exam_id {exam_id} in {path} has no row "
                                   "in exams.csv.")
          if code15.patient_split(row["patient_id"]) != split:
            continue
          if not np.all(np.isfinite(tracing)):
            raise code15.BadRecord(f"exam_id {exam_id}: NaN/Inf samples.")
          hot = code15.labels(row)
        except code15.BadRecord as e:
          if row is None and split != code15.SPLIT_FRACTIONS[0][0]:
            continue  # an orphan exam is reported once, by the first split
          self.skip_or_raise(e, counts)
          continue
        counts["examples"] += 1
        yield exam_id, {
            "ecg": tracing, "labels": hot, "id": exam_id,
            "patient_id": int(row["patient_id"]), "age": _float(row["age"]),
            "sex": 0 if row["is_male"].strip().lower() == "true" else 1}
    self.info.metadata["build_counts"] = {
        k: dict(v) for k, v in sorted(self._counts.items())}
