"""ECG preprocessing and seeded augmentations on [T, L] float32 numpy arrays.

Preprocessing is deterministic (train and eval alike): `bandpass`,
`standardize`, `resample`. Augmentations take a `numpy.random.Generator`
(the pipeline derives one per example from its seed and the example's
position, so a resumed run draws the same augmentations):
`random_crop`, `amplitude_scale`, `gaussian_noise`, `baseline_wander`,
`lead_dropout`. `make_preprocess`/`make_augment` build the per-example
functions the grain pipeline maps from `config.data`.
"""

from __future__ import annotations

import fractions

import numpy as np


def bandpass(x: np.ndarray, fs: float, low: float, high: float,
             order: int = 3) -> np.ndarray:
  """Zero-phase Butterworth band-pass (second-order sections, filtfilt)."""
  import scipy.signal  # pylint: disable=g-import-not-at-top
  if not 0 < low < high < fs / 2:
    raise ValueError(f"bandpass: need 0 < low={low} < high={high} < fs/2="
                     f"{fs / 2}.")
  sos = scipy.signal.butter(order, (low, high), btype="bandpass", fs=fs,
                            output="sos")
  return scipy.signal.sosfiltfilt(sos, x, axis=0).astype(np.float32)


def standardize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Per-lead z-score over time (a flat lead stays 0, not NaN)."""
  mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True)
  return ((x - mean) / (std + eps)).astype(np.float32)


def resample(x: np.ndarray, fs: float, target: float) -> np.ndarray:
  """[T, L] at `fs` -> [T·target/fs, L] by polyphase filtering."""
  if fs == target:
    return x
  import scipy.signal  # pylint: disable=g-import-not-at-top
  ratio = (fractions.Fraction(target).limit_denominator(1000)
           / fractions.Fraction(fs).limit_denominator(1000))
  return scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator,
                                    axis=0).astype(np.float32)


def random_crop(x: np.ndarray, length: int, rng) -> np.ndarray:
  """A random window of `length` samples (zero-padded if x is shorter)."""
  if len(x) <= length:
    return np.pad(x, ((0, length - len(x)), (0, 0)))
  start = rng.integers(0, len(x) - length + 1)
  return x[start:start + length]


def amplitude_scale(x: np.ndarray, low: float, high: float, rng):
  """Every lead times one factor drawn uniformly from [low, high]."""
  return (x * rng.uniform(low, high)).astype(np.float32)


def gaussian_noise(x: np.ndarray, std: float, rng):
  """Adds i.i.d. N(0, std²) noise."""
  return (x + rng.normal(0.0, std, x.shape)).astype(np.float32)


def baseline_wander(x: np.ndarray, fs: float, amplitude: float, rng,
                    max_hz: float = 0.5):
  """Adds a shared sinusoidal drift (≤ max_hz, random phase) per lead scale."""
  t = np.arange(len(x)) / fs
  freq = rng.uniform(0.05, max_hz)
  drift = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
  gains = rng.uniform(-amplitude, amplitude, x.shape[1])
  return (x + drift[:, None] * gains[None, :]).astype(np.float32)


def lead_dropout(x: np.ndarray, p: float, rng):
  """Zeroes each lead with probability p (never all of them)."""
  keep = rng.random(x.shape[1]) >= p
  if not keep.any():
    keep[rng.integers(x.shape[1])] = True
  return (x * keep[None, :]).astype(np.float32)


def make_preprocess(aug_cfg, fs: float):
  """ecg -> ecg: band-pass (if `bandpass_hz`), standardize, resample.

  Band-pass runs at the stored rate `fs`; `resample_hz` (0: keep) is the
  rate the model sees, so its patching must be set for that rate.
  Returns None when no preprocessing is switched on.
  """
  if not (aug_cfg.bandpass_hz or aug_cfg.standardize or aug_cfg.resample_hz):
    return None

  def preprocess(ecg):
    if aug_cfg.bandpass_hz:
      ecg = bandpass(ecg, fs, *aug_cfg.bandpass_hz)
    if aug_cfg.standardize:
      ecg = standardize(ecg)
    if aug_cfg.resample_hz:
      ecg = resample(ecg, fs, aug_cfg.resample_hz)
    return ecg
  return preprocess


def make_augment(aug_cfg, fs: float):
  """(ecg, rng) -> ecg with the augmentations whose setting is non-zero.

  Returns None when every augmentation is off.
  """
  if not (aug_cfg.scale or aug_cfg.baseline_wander or aug_cfg.noise_std
          or aug_cfg.lead_dropout):
    return None

  def augment(ecg, rng):
    if aug_cfg.scale:
      ecg = amplitude_scale(ecg, 1.0 - aug_cfg.scale, 1.0 + aug_cfg.scale,
                            rng)
    if aug_cfg.baseline_wander:
      ecg = baseline_wander(ecg, fs, aug_cfg.baseline_wander, rng)
    if aug_cfg.noise_std:
      ecg = gaussian_noise(ecg, aug_cfg.noise_std, rng)
    if aug_cfg.lead_dropout:
      ecg = lead_dropout(ecg, aug_cfg.lead_dropout, rng)
    return ecg
  return augment
