"""Preprocessing and augmentations: spectra, statistics, seeding."""

import numpy as np
import pytest

from evl_ecg_jax.data import transforms

FS = 100


def _tone(hz, seconds=10, leads=12):
  t = np.arange(seconds * FS) / FS
  return np.repeat(np.sin(2 * np.pi * hz * t)[:, None], leads, 1).astype(
      np.float32)


def _amplitude(x, hz):
  """Amplitude of the `hz` component of lead 0 (FFT, interior window)."""
  spectrum = np.abs(np.fft.rfft(x[:, 0])) * 2 / len(x)
  return spectrum[int(round(hz * len(x) / FS))]


def test_bandpass_keeps_the_band_and_removes_drift_and_high_frequencies():
  for hz, keep in ((10.0, True), (0.05, False), (48.0, False)):
    out = transforms.bandpass(_tone(hz, seconds=40), FS, 0.5, 40.0)
    ratio = _amplitude(out, hz) / _amplitude(_tone(hz, seconds=40), hz)
    assert (ratio > 0.95) if keep else (ratio < 0.1), (hz, ratio)
  with pytest.raises(ValueError, match="fs/2"):
    transforms.bandpass(_tone(1.0), FS, 0.5, 60.0)


def test_standardize_per_lead_and_flat_leads_stay_finite():
  x = np.random.default_rng(0).normal(3.0, 5.0, (1000, 12)).astype(np.float32)
  x[:, 4] = 2.0  # flat lead
  out = transforms.standardize(x)
  keep = [i for i in range(12) if i != 4]
  np.testing.assert_allclose(out[:, keep].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[:, keep].std(0), 1.0, atol=1e-4)
  np.testing.assert_array_equal(out[:, 4], 0.0)


def test_augmentations_are_seeded_and_do_what_they_say():
  x = _tone(5.0)
  rng = lambda: np.random.default_rng(7)
  for fn in (lambda r: transforms.random_crop(x, 250, r),
             lambda r: transforms.amplitude_scale(x, 0.8, 1.2, r),
             lambda r: transforms.gaussian_noise(x, 0.1, r),
             lambda r: transforms.baseline_wander(x, FS, 0.3, r),
             lambda r: transforms.lead_dropout(x, 0.5, r)):
    np.testing.assert_array_equal(fn(rng()), fn(rng()))  # same seed
    assert fn(rng()).dtype == np.float32
  crop = transforms.random_crop(x, 250, rng())
  starts = [s for s in range(len(x) - 249) if np.array_equal(x[s:s + 250],
                                                             crop)]
  assert crop.shape == (250, 12) and starts  # a contiguous window
  assert transforms.random_crop(x[:100], 250, rng()).shape == (250, 12)
  factor = transforms.amplitude_scale(x, 0.8, 1.2, rng())[25, 0] / x[25, 0]
  assert 0.8 <= factor <= 1.2
  noise = transforms.gaussian_noise(x, 0.1, rng()) - x
  assert noise.std() == pytest.approx(0.1, rel=0.05)
  drift = transforms.baseline_wander(x, FS, 0.3, rng()) - x
  assert np.abs(drift).max() <= 0.3 + 1e-6
  assert _amplitude(drift, 5.0) < 1e-2  # slow drift, no in-band energy
  dropped = [np.mean(~transforms.lead_dropout(x, 0.5, np.random.default_rng(
      s)).any(0)) for s in range(200)]
  assert np.mean(dropped) == pytest.approx(0.5, abs=0.05)
  all_zero = transforms.lead_dropout(x, 1.0, rng())
  assert all_zero.any(0).sum() == 1  # never every lead
