"""What our TFDS builders share: TF-free files, the ECG record schema and the
bad-record policy."""

from __future__ import annotations

from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds


def int_feature():
  """A scalar int64 feature."""
  return tfds.features.Tensor(shape=(), dtype=np.int64)


def ecg_features(samples: int, num_classes: int | None, **extra):
  """The record schema every ECG builder shares, plus builder-specific fields.

  `ecg` f32 [samples, 12], multi-hot `labels` f32 [num_classes] (None: set by
  the build), `id` int64 (what `pipeline.FEATURES` reads), `age` f32 (NaN if
  unknown) and `sex` int64 (0 male, 1 female, -1 unknown).
  """
  return tfds.features.FeaturesDict({
      "ecg": tfds.features.Tensor(shape=(samples, 12), dtype=np.float32),
      "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
      "id": int_feature(),
      "age": tfds.features.Tensor(shape=(), dtype=np.float32),
      "sex": int_feature(),
      **extra})


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A generator builder that writes array_record files by default.

  array_record (unlike tfrecord) needs no TensorFlow to read, so
  `tfds.data_source(...)` works as is. Abstract (no `_info`), so TFDS does
  not register it as a dataset.
  """

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def skip_or_raise(self, error: ValueError, counter) -> None:
    """Counts and logs a bad record with `skip_bad_records`, else raises it.

    The raised error keeps the record's name and says how to skip instead.
    """
    if not self.builder_config.skip_bad_records:
      raise type(error)(f"{error} (set skip_bad_records=True in the "
                        f"{self.name} builder config to skip and count such "
                        "records)") from None
    counter["skipped"] += 1
    logging.warning("%s: skipped: %s", self.name, error)
