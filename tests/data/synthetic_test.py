"""Tests of the synthetic ECG generator and the `synthetic_ecg` TFDS builder."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import signal
from sklearn import linear_model, metrics, preprocessing
import tensorflow_datasets as tfds

from evl_ecg_jax.data import builders  # noqa: F401  (registers the builder)
from evl_ecg_jax.data import synthetic
from evl_ecg_jax.data.builders import synthetic_ecg

FS = 100
N_CLEAN = 1200
LEAD = {name: i for i, name in enumerate(synthetic.LEADS)}
INDEPENDENT = [LEAD[n] for n in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
TERRITORIES = {"anterior": ("V1", "V2", "V3", "V4"),
               "inferior": ("II", "III", "aVF"),
               "lateral": ("I", "aVL", "V5", "V6")}


@pytest.fixture(scope="module")
def clean() -> tuple[np.ndarray, np.ndarray]:
  """Clean 100 Hz records of stream 11 and their labels."""
  return synthetic.generate(11, N_CLEAN, noise=False)


def only(labels: np.ndarray, name: str) -> np.ndarray:
  """Mask of records whose single label is `name`."""
  target = np.array(synthetic.CLASSES) == name
  return (labels == target).all(axis=1)


def r_peaks(ecg: np.ndarray, fs: int = FS) -> np.ndarray:
  """QRS positions: peaks of the spatial magnitude of the independent leads."""
  mag = np.linalg.norm(ecg[:, INDEPENDENT], axis=1)
  peaks, _ = signal.find_peaks(mag, height=0.5 * mag.max(),
                               distance=int(0.3 * fs))
  return peaks[(peaks >= 0.2 * fs) & (peaks < len(ecg) - 0.2 * fs)]


def st_level(ecg: np.ndarray) -> np.ndarray:
  """Per-lead ST level: mean 80-120 ms after the QRS peak minus PR segment."""
  peaks = r_peaks(ecg)
  st = np.stack([ecg[p + 8:p + 13].mean(0) for p in peaks])
  pr = np.stack([ecg[p - 7:p - 4].mean(0) for p in peaks])
  return (st - pr).mean(0)


def qrs_width(ecg: np.ndarray) -> float:
  """QRS duration proxy (s): time within +-120 ms of the QRS peak where the
  spatial magnitude exceeds a quarter of its peak value."""
  mag = np.linalg.norm(ecg[:, INDEPENDENT], axis=1)
  return float(np.mean([(mag[p - 12:p + 13] > 0.25 * mag[p]).sum()
                        for p in r_peaks(ecg)])) / FS


def summary_features(ecg: np.ndarray) -> np.ndarray:
  """Per-lead mean, std, min, max, peak-to-peak and quantiles: [N, 12 * 10]."""
  quantiles = np.quantile(ecg, [0.05, 0.25, 0.5, 0.75, 0.95], axis=1)
  stats = [ecg.mean(1), ecg.std(1), ecg.min(1), ecg.max(1), np.ptp(ecg, 1)]
  return np.concatenate(stats + list(quantiles), axis=1)


def test_is_numpy_only():
  code = ("import sys, evl_ecg_jax.data.synthetic; "
          "print(sorted({'jax', 'tensorflow', 'tensorflow_datasets'} "
          "& set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_deterministic_per_seed_and_index():
  ecg, labels = synthetic.generate_record(7, 3)
  ecg2, labels2 = synthetic.generate_record(7, 3)
  np.testing.assert_array_equal(ecg, ecg2)
  np.testing.assert_array_equal(labels, labels2)
  assert not np.allclose(ecg, synthetic.generate_record(7, 4)[0], atol=0.05)
  assert not np.allclose(ecg, synthetic.generate_record(8, 3)[0], atol=0.05)


def test_independent_of_generation_order():
  ecgs, labels = synthetic.generate(5, 4, start=10)
  for i in range(4):
    ecg, label = synthetic.generate_record(5, 10 + i)
    np.testing.assert_array_equal(ecgs[i], ecg)
    np.testing.assert_array_equal(labels[i], label)
  assert synthetic.generate(5, 0)[0].shape == (0, 1000, 12)


@pytest.mark.parametrize("rate", [100, 500])
def test_shapes_dtypes_and_scale(rate: int):
  ecgs, labels = synthetic.generate(2, 8, sampling_rate=rate)
  assert ecgs.shape == (8, 10 * rate, 12) and ecgs.dtype == np.float32
  assert labels.shape == (8, 5) and labels.dtype == np.float32
  assert np.isfinite(ecgs).all()
  short = synthetic.generate_record(2, 0, sampling_rate=rate, duration_s=2.5)
  assert short[0].shape == (rate * 5 // 2, 12)


def test_millivolt_scale(clean):
  peak = np.abs(clean[0]).max(axis=(1, 2))
  assert ((peak > 0.3) & (peak < 5.)).all(), (peak.min(), peak.max())
  v5_r = clean[0][only(clean[1], "NORM"), :, LEAD["V5"]].max(1)
  assert 0.6 < np.median(v5_r) < 2.


@pytest.mark.parametrize("kwargs, name", [
    (dict(sampling_rate=250), "sampling_rate"),
    (dict(duration_s=0.), "duration_s"),
    (dict(duration_s=1.234), "duration_s"),
    (dict(index=-1), "index"),
    (dict(seed=-3), "seed"),
])
def test_invalid_arguments(kwargs, name):
  args = dict(seed=0, index=0) | kwargs
  with pytest.raises(ValueError, match=name):
    synthetic.generate_record(args.pop("seed"), args.pop("index"), **args)


def test_invalid_count():
  with pytest.raises(ValueError, match="start"):
    synthetic.generate(0, 2, start=-1)


@pytest.mark.parametrize("noise", [False, True])
def test_einthoven_goldberger(noise: bool):
  """Exact for the clean projection; also with noise, which (as in PTB-XL,
  where III, aVR, aVL, aVF are computed from I and II) enters via I and II."""
  ecgs, _ = synthetic.generate(3, 4, sampling_rate=500, noise=noise)
  i, ii = ecgs[..., LEAD["I"]], ecgs[..., LEAD["II"]]
  for name, derived in (("III", ii - i), ("aVR", -(i + ii) / 2),
                        ("aVL", i - ii / 2), ("aVF", ii - i / 2)):
    np.testing.assert_allclose(ecgs[..., LEAD[name]], derived, atol=1e-5,
                               err_msg=name)


def test_100hz_and_500hz_are_the_same_signal():
  for index in range(4):
    low, labels_low = synthetic.generate_record(4, index, noise=False)
    high, labels_high = synthetic.generate_record(4, index, sampling_rate=500,
                                                  noise=False)
    np.testing.assert_array_equal(labels_low, labels_high)
    np.testing.assert_allclose(high[::5], low, atol=1e-4)
    noisy = synthetic.generate_record(4, index, sampling_rate=500)[0]
    assert 0 < np.abs(noisy - high).mean() < 0.3  # Noise differs, moderately.


def test_label_semantics_and_prevalence(clean):
  labels = clean[1]
  assert set(np.unique(labels)) == {0., 1.}
  np.testing.assert_array_equal(labels[:, 0], 1 - labels[:, 1:].max(1))
  prevalence = dict(zip(synthetic.CLASSES, labels.mean(0)))
  expected = dict(synthetic.PREVALENCE, NORM=np.prod(
      [1 - p for p in synthetic.PREVALENCE.values()]))
  for name, p in expected.items():
    assert abs(prevalence[name] - p) < 0.05, (name, prevalence[name], p)
  assert (labels[:, 1:].sum(1) >= 2).any()  # Multi-label records exist.


def test_conduction_disturbance_widens_qrs(clean):
  ecgs, labels = clean
  cd, norm = (np.mean([qrs_width(e) for e in ecgs[only(labels, name)]])
              for name in ("CD", "NORM"))
  assert cd > norm + 0.015, (cd, norm)


def test_hypertrophy_raises_qrs_voltage(clean):
  ecgs, labels = clean
  voltage = np.ptp(ecgs, axis=1).sum(1)
  assert voltage[only(labels, "HYP")].mean() > 1.2 * voltage[
      only(labels, "NORM")].mean()


def test_st_shifts(clean):
  """MI: ST elevation in its territory; STTC: lateral ST depression."""
  ecgs, labels = clean
  st = {name: np.stack([st_level(e) for e in ecgs[only(labels, name)]])
        for name in ("NORM", "MI", "STTC")}

  def territory_max(levels: np.ndarray) -> float:
    """Mean over records of the highest territory-mean ST level."""
    return np.max([levels[:, [LEAD[n] for n in leads]].mean(1)
                   for leads in TERRITORIES.values()], axis=0).mean()

  mi, norm = territory_max(st["MI"]), territory_max(st["NORM"])
  assert mi > norm + 0.03, (mi, norm)
  lateral = [LEAD[n] for n in ("I", "V5", "V6")]
  sttc, norm = st["STTC"][:, lateral].mean(), st["NORM"][:, lateral].mean()
  assert sttc < norm - 0.02, (sttc, norm)


def test_heart_rate_and_variability(clean):
  bpm, rr_sd = [], []
  for ecg in clean[0][:200]:
    lead_ii = ecg[:, LEAD["II"]]
    peaks, _ = signal.find_peaks(lead_ii, height=0.5 * lead_ii.max(),
                                 distance=int(0.4 * FS))
    rr = np.diff(peaks) / FS
    bpm.append(60. / rr.mean())
    rr_sd.append(rr.std())
  bpm = np.array(bpm)
  assert ((bpm > 48.) & (bpm < 113.)).all(), (bpm.min(), bpm.max())
  assert bpm.min() < 60. and bpm.max() > 100.
  assert np.median(rr_sd) > 0.005  # Heart-rate variability.


def test_task_is_learnable_but_not_trivial():
  (x_train, y_train), (x_test, y_test) = (
      synthetic.generate(seed, n) for seed, n in ((21, 600), (22, 400)))
  scaler = preprocessing.StandardScaler().fit(summary_features(x_train))
  f_train, f_test = (scaler.transform(summary_features(x))
                     for x in (x_train, x_test))
  aucs = [metrics.roc_auc_score(y_test[:, c], linear_model.LogisticRegression(
      C=0.3, max_iter=2000).fit(f_train, y_train[:, c]).predict_proba(
          f_test)[:, 1]) for c in range(len(synthetic.CLASSES))]
  assert 0.6 < np.mean(aucs) < 0.97, aucs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
  """The `tiny` config built into a temporary data_dir."""
  data_dir = tmp_path_factory.mktemp("tfds")
  return tfds.data_source("synthetic_ecg/tiny", data_dir=data_dir)


def test_builder_tiny_matches_generator(tiny):
  assert {split: len(src) for split, src in tiny.items()} == {
      "train": 128, "validation": 64, "test": 64}
  for split, src in tiny.items():
    for j in (0, 5, len(src) - 1):
      example = src[j]
      assert example["id"] == j
      ecg, labels = synthetic.generate_record(
          synthetic_ecg.stream_seed(0, split), j)
      assert isinstance(example["ecg"], np.ndarray)
      np.testing.assert_array_equal(example["ecg"], ecg)
      np.testing.assert_array_equal(example["labels"], labels)


def test_builder_splits_are_disjoint(tiny):
  fingerprints = [src[j]["ecg"][:50].tobytes()
                  for src in tiny.values() for j in range(len(src))]
  assert len(set(fingerprints)) == 128 + 64 + 64


def test_builder_custom_config_and_metadata(tmp_path):
  config = synthetic_ecg.SyntheticEcgConfig(
      name="custom", sampling_rate=100, num_train=10, num_validation=5,
      num_test=5, seed=3)
  builder = tfds.builder("synthetic_ecg", config=config, data_dir=tmp_path,
                         file_format="array_record")
  builder.download_and_prepare()
  src = builder.as_data_source()
  assert {split: len(s) for split, s in src.items()} == {
      "train": 10, "validation": 5, "test": 5}
  expected, _ = synthetic.generate_record(synthetic_ecg.stream_seed(3, "test"),
                                         2)
  np.testing.assert_array_equal(src["test"][2]["ecg"], expected)
  assert builder.info.metadata["leads"] == list(synthetic.LEADS)
  assert builder.info.metadata["classes"] == list(synthetic.CLASSES)
  assert builder.info.features["ecg"].shape == (1000, 12)
