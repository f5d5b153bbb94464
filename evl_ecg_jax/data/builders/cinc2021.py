"""TFDS builder `cinc2021` over PhysioNet/CinC Challenge 2020-21 records.

Nothing is downloaded: manual_dir is a folder holding the Challenge's
`.hea`/`.mat` pairs at any depth (the official training set's
`training/<database>/<group>/` layout works as it is). One split per source
database found (`cpsc2018`, `cpsc_extra`, `incart`, `ptb`, `ptb_xl`,
`g12ec`, `chapman_shaoxing`, `ningbo`), so e.g. evaluating on G12EC alone is
`split="g12ec"` and training on the rest is a sum of splits. Records are
resampled to the config's rate and cropped/padded to `duration_s`
(`evl_ecg_jax.data.cinc.crop_or_pad`). Labels are the 26 scored classes of
the Challenge (`cinc.CLASS_NAMES`). Bad records stop the build with their
name, or with `skip_bad_records` are skipped; counts per split
(`examples`, `skipped`, `no_scored_label`; `empty_sources`) are in the
metadata.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from evl_ecg_jax.data import cinc
from evl_ecg_jax.data import transforms
from evl_ecg_jax.data.builders import _base


@dataclasses.dataclass
class Cinc2021Config(tfds.core.BuilderConfig):
  """Common sampling rate, fixed duration and the bad-record policy."""
  sampling_rate: int = 500
  duration_s: int = 10
  skip_bad_records: bool = False


def _sex(value: str) -> int:
  """0 male, 1 female (PTB-XL's coding), -1 unknown."""
  return {"male": 0, "m": 0, "female": 1, "f": 1}.get(value.lower(), -1)


def _age(value: str) -> float:
  try:
    return float(value)
  except ValueError:
    return float("nan")  # 'NaN', '' and other unknowns


class Cinc2021(_base.ArrayRecordBuilder):
  """12-lead ECGs of the PhysioNet/CinC Challenge 2020-21, one split per source."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Cinc2021Config(name="500hz", description="500 Hz, 10 s."),
      Cinc2021Config(name="100hz", sampling_rate=100,
                     description="100 Hz, 10 s (PTB-XL's low rate)."),
  ]
  DEFAULT_CONFIG_NAME = "500hz"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the Challenge 2021 training data from PhysioNet "
      "(https://physionet.org/content/challenge-2021/) and set manual_dir "
      "(config.data.manual_dir) to the folder holding the .hea/.mat files.")

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        description=("PhysioNet/CinC Challenge 2020-21 12-lead ECGs, "
                     f"resampled to {cfg.sampling_rate} Hz, first "
                     f"{cfg.duration_s} s (zero-padded), 26 scored classes."),
        features=_base.ecg_features(
            cfg.duration_s * cfg.sampling_rate, len(cinc.CLASS_NAMES),
            record=tfds.features.Text(), valid_length=_base.int_feature()),
        supervised_keys=("ecg", "labels"),
        homepage="https://physionet.org/content/challenge-2021/",
        metadata=tfds.core.MetadataDict(
            leads=list(cinc.LEADS), classes=list(cinc.CLASS_NAMES),
            sampling_rate=cfg.sampling_rate, duration_s=cfg.duration_s),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    """One split per source database that keeps at least one record.

    `id` is the rank of the record name among all records found. With
    `skip_bad_records` a first pass reads every record and skips (counts)
    the bad ones, so a source left empty gets no split (listed in
    `empty_sources`); without it a bad record stops the build with its name.
    """
    cfg = self.builder_config
    kept = collections.defaultdict(list)
    counts = collections.defaultdict(collections.Counter)
    for index, path in enumerate(cinc.find_records(str(dl_manager.manual_dir))):
      name = os.path.basename(path)
      try:
        source = cinc.source_database(name)
      except cinc.BadRecord as e:
        self.skip_or_raise(e, counts["unknown_source"])
        continue
      if cfg.skip_bad_records:
        try:
          cinc.read_record(path)
        except cinc.BadRecord as e:
          self.skip_or_raise(e, counts[source])
          continue
      kept[source].append((index, path))
    self._counts = counts
    self.info.metadata["empty_sources"] = sorted(set(counts) - set(kept))
    return {source: self._generate_examples(records, counts[source])
            for source, records in sorted(kept.items())}

  def _generate_examples(self, records, counts):
    """Yields (id, example), resampled and cropped/padded."""
    cfg = self.builder_config
    for index, path in records:
      try:
        signal, fs, fields = cinc.read_record(path)
      except cinc.BadRecord as e:  # only without skip_bad_records
        self.skip_or_raise(e, counts)
        continue
      ecg, valid = cinc.crop_or_pad(
          transforms.resample(signal, fs, cfg.sampling_rate),
          cfg.duration_s * cfg.sampling_rate)
      labels = cinc.scored_labels(fields.get("Dx", ""))
      counts["examples"] += 1
      counts["no_scored_label"] += int(not labels.any())
      yield index, {"ecg": ecg, "labels": labels, "id": index,
                    "record": os.path.basename(path), "valid_length": valid,
                    "age": _age(fields.get("Age", "")),
                    "sex": _sex(fields.get("Sex", ""))}
    self.info.metadata["build_counts"] = {
        k: dict(v) for k, v in sorted(self._counts.items())}
