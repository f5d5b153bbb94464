"""Test setup: 8 fake CPU devices (set before jax is imported) and shared data."""

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs/` is read as files by main; tests import it.


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir holding synthetic_ecg/tiny, built once per session."""
  from evl_ecg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg = ml_collections.ConfigDict({
      "tfds_name": "synthetic_ecg/tiny", "data_dir": data_dir,
      "manual_dir": "", "splits": {"train": "train"}})
  pipeline.source(cfg, "train")
  return data_dir
