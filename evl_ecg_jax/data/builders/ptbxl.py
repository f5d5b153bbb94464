"""TFDS builder `ptbxl` over a PTB-XL copy in its official layout (manual_dir).

Nothing is downloaded: point TFDS's manual_dir at the folder that holds
`ptbxl_database.csv`, `scp_statements.csv` and `records100/` (and
`records500/` for the 500 Hz configs):

  tfds.data_source("ptbxl/100hz_superdiagnostic", split="fold1+fold2",
                   download_and_prepare_kwargs={"download_config":
                       tfds.download.DownloadConfig(manual_dir=ROOT)})

Splits are the `strat_fold`s, `fold1` .. `fold10` (only the folds present in
the CSV), so train/validation/test are chosen when reading (the benchmark's
train 1-8 / validation 9 / test 10 is `fold1+...+fold8`, `fold9`, `fold10`;
see `configs/default.py:data=ptbxl`) without rebuilding. Records without a
label of the config's label set are dropped; with `skip_bad_records` an
unreadable record is skipped instead of failing the build. Both are counted
per fold in the dataset's metadata (`build_counts[fold]` with `examples`,
`dropped_no_label`, `skipped`; `empty_folds`) and logged; `classes` holds
the label order.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

from absl import logging
import tensorflow_datasets as tfds

from evl_ecg_jax.data import ptbxl
from evl_ecg_jax.data.builders import _base


@dataclasses.dataclass
class PtbxlConfig(tfds.core.BuilderConfig):
  """Sampling rate (100 | 500), label set, and the bad-record policy."""
  sampling_rate: int = 100
  label_set: str = "superdiagnostic"
  skip_bad_records: bool = False


def _configs():
  return [PtbxlConfig(name=f"{rate}hz_{label_set}", sampling_rate=rate,
                      label_set=label_set,
                      description=f"{rate} Hz, {label_set} labels.")
          for rate in (100, 500) for label_set in ptbxl.LABEL_SETS]


class Ptbxl(_base.ArrayRecordBuilder):
  """PTB-XL 12-lead 10-s ECGs with benchmark label sets, one split per fold."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "100hz_superdiagnostic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download PTB-XL from PhysioNet (https://physionet.org/content/ptb-xl/) "
      "and set manual_dir (config.data.manual_dir) to the folder holding "
      "ptbxl_database.csv, scp_statements.csv and records100/.")

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        description=("PTB-XL 12-lead ECGs (10 s), leads "
                     f"{', '.join(ptbxl.LEADS)}, {cfg.label_set} labels "
                     "aggregated as in the PTB-XL benchmark."),
        features=_base.ecg_features(
            ptbxl.DURATION_S * cfg.sampling_rate, None,
            patient_id=_base.int_feature(), report=tfds.features.Text()),
        supervised_keys=("ecg", "labels"),
        homepage="https://physionet.org/content/ptb-xl/",
        metadata=tfds.core.MetadataDict(
            leads=list(ptbxl.LEADS), sampling_rate=cfg.sampling_rate,
            label_set=cfg.label_set),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    """One split per strat_fold that keeps at least one record.

    A first pass selects the records: labels from the CSV (records without
    one are dropped) and, with `skip_bad_records`, a read of each signal
    (unreadable ones are skipped). Both are counted per fold; a fold left
    empty gets no split (TFDS cannot write one) and is listed in
    `empty_folds`. Without `skip_bad_records` a bad record stops the build
    with its name.
    """
    root = str(dl_manager.manual_dir)
    cfg = self.builder_config
    statements = ptbxl.read_statements(root)
    classes = ptbxl.statement_classes(statements, cfg.label_set)
    names = ptbxl.class_names(statements, cfg.label_set)
    counts = collections.defaultdict(collections.Counter)
    kept = collections.defaultdict(list)
    for row in ptbxl.read_database(root):
      fold = f"fold{ptbxl.as_int(row['strat_fold'])}"
      try:
        hot = ptbxl.labels(ptbxl.parse_scp_codes(row["scp_codes"],
                                                 row["ecg_id"]),
                           classes, names)
        if not hot.any():
          counts[fold]["dropped_no_label"] += 1
          continue
        if cfg.skip_bad_records:
          self._signal(root, row)
      except ptbxl.BadRecord as e:
        self.skip_or_raise(e, counts[fold])
        continue
      counts[fold]["examples"] += 1
      kept[fold].append((row, hot))
    self.info.metadata.update(
        classes=list(names),
        build_counts={k: dict(v) for k, v in sorted(counts.items())},
        empty_folds=sorted(set(counts) - set(kept)))
    logging.info("ptbxl build counts: %s", self.info.metadata["build_counts"])
    return {fold: self._generate_examples(root, records)
            for fold, records in sorted(kept.items())}

  def _signal(self, root, row):
    rate = self.builder_config.sampling_rate
    return ptbxl.read_signal(ptbxl.record_path(root, row, rate), rate,
                             row["ecg_id"])

  def _generate_examples(self, root, records):
    """Yields (ecg_id, example) for the records selected above."""
    for row, hot in records:
      ecg_id = int(row["ecg_id"])
      yield ecg_id, {
          "ecg": self._signal(root, row), "labels": hot, "id": ecg_id,
          "patient_id": ptbxl.as_int(row["patient_id"]),
          "age": ptbxl.as_float(row["age"]), "sex": ptbxl.as_int(row["sex"]),
          "report": row["report"]}
