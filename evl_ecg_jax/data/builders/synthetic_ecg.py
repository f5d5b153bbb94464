"""TFDS builder `synthetic_ecg` over `evl_ecg_jax.data.synthetic` (no download).

Split streams: record `i` of split `split` is
`synthetic.generate_record(stream_seed(seed, split), i)` with
`stream_seed(seed, split) = 1000 * seed + {train: 0, validation: 1, test: 2}`,
so the splits never share a record; record j of a split file has id j
(shuffling is left to the input pipeline). Files default to array_record, which
(unlike tfrecord) needs no TensorFlow: `tfds.data_source('synthetic_ecg/tiny',
data_dir=...)` works as is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from evl_ecg_jax.data import synthetic
from evl_ecg_jax.data.builders import _base

SPLIT_OFFSETS = {"train": 0, "validation": 1, "test": 2}
DURATION_S = 10.0


def stream_seed(seed: int, split: str) -> int:
  """Seed of the `synthetic.generate_record` stream of `split`."""
  return 1000 * seed + SPLIT_OFFSETS[split]


@dataclasses.dataclass
class SyntheticEcgConfig(tfds.core.BuilderConfig):
  """Sampling rate, split sizes and seed of a synthetic_ecg variant."""
  sampling_rate: int = 100
  num_train: int = 4000
  num_validation: int = 800
  num_test: int = 800
  seed: int = 0


class SyntheticEcg(_base.ArrayRecordBuilder):
  """Synthetic 12-lead ECGs (10 s) with PTB-XL diagnostic superclass labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticEcgConfig(name="100hz", description="100 Hz, 4000/800/800."),
      SyntheticEcgConfig(name="500hz", sampling_rate=500,
                         description="500 Hz, 4000/800/800."),
      SyntheticEcgConfig(name="tiny", num_train=128, num_validation=64,
                         num_test=64, description="100 Hz, 128/64/64 (tests)."),
  ]
  DEFAULT_CONFIG_NAME = "100hz"

  def _info(self) -> tfds.core.DatasetInfo:
    """Features, lead/class order (description and metadata), no homepage."""
    steps = round(DURATION_S * self.builder_config.sampling_rate)
    return self.dataset_info_from_configs(
        description=(
            "Synthetic 12-lead ECGs from a cardiac dipole model with "
            "multi-hot PTB-XL diagnostic superclass labels. Lead order: "
            f"{', '.join(synthetic.LEADS)}. Class order: "
            f"{', '.join(synthetic.CLASSES)}. Units: mV."),
        features=tfds.features.FeaturesDict({
            "ecg": tfds.features.Tensor(shape=(steps, 12), dtype=np.float32),
            "labels": tfds.features.Tensor(shape=(5,), dtype=np.float32),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("ecg", "labels"),
        disable_shuffling=True,  # Record j of a split has id j.
        homepage=None,
        metadata=tfds.core.MetadataDict(
            leads=list(synthetic.LEADS), classes=list(synthetic.CLASSES),
            sampling_rate=self.builder_config.sampling_rate),
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    """One generator per split; nothing to download."""
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLIT_OFFSETS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    """Yields (id, example) for records 0..num_<split>-1 of the split stream."""
    cfg = self.builder_config
    for i in range(getattr(cfg, f"num_{split}")):
      ecg, labels = synthetic.generate_record(
          stream_seed(cfg.seed, split), i, sampling_rate=cfg.sampling_rate,
          duration_s=DURATION_S)
      yield i, {"ecg": ecg, "labels": labels, "id": i}
