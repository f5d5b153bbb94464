"""Seeded numpy generator of synthetic 12-lead ECGs with PTB-XL-like labels.

The model is a moving cardiac dipole: the heart vector H(t) (x = patient
left, y = inferior, z = anterior) is a sum over beats and waves (P, Q, R, S,
R', ST plateau, T) of bumps exp(-|(t - t_beat - offset) / width|^p / 2), each
wave with its own 3-D vector (direction times amplitude in mV). Leads I/II and
V1-V6 are projections of H on lead vectors; III, aVR, aVL and aVF are derived
from I and II (Einthoven/Goldberger), as in PTB-XL, so the identities hold
exactly. Pathologies (MI, STTC, CD, HYP) edit the wave table in dipole space
with a random severity, so lead-specific effects emerge from the projection.

Record `index` of stream `seed` depends only on (seed, index, sampling_rate,
duration_s): it uses `np.random.default_rng([seed, index])`. All continuous-time
parameters are drawn before any per-sample noise, so the 100 Hz and 500 Hz
versions of a record are the same clean signal sampled at two rates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF",
         "V1", "V2", "V3", "V4", "V5", "V6")
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
PREVALENCE = {"MI": 0.2, "STTC": 0.25, "CD": 0.2, "HYP": 0.15}
SAMPLING_RATES = (100, 500)

# Wave table rows; the ST plateau is a flat-topped bump exp(-x^6 / 2).
_P, _Q, _R, _S, _RP, _ST, _T = range(7)
_REPOL = np.array([0, 0, 0, 0, 0, 1, 1], bool)  # Offsets scale with sqrt(RR).
_BASE_DIRS = np.array([[0.55, 0.8, 0.15], [-0.6, 0.2, 0.75],
                       [0.75, 0.55, -0.25], [-0.35, -0.45, -0.8],
                       [0., 0., 1.], [0.6, 0.6, 0.3], [0.6, 0.55, 0.35]])
# Lead vectors of the 8 independent leads I, II, V1..V6. The precordial
# angles (x towards z) and gains follow the Dower (1980) VCG-to-ECG matrix.
_V_DEG = np.deg2rad([119., 88., 55., 26., 4., -15.])
_V_GAIN = np.array([1.05, 1.39, 1.55, 1.35, 1.13, 0.86])
_LEAD_VECTORS = np.concatenate([
    [[1., 0., 0.], [0.5, np.sqrt(3) / 2, 0.]],
    _V_GAIN[:, None] * np.stack([np.cos(_V_DEG), 0 * _V_DEG, np.sin(_V_DEG)],
                                -1)])
# Maps the 8 independent leads to the 12 standard leads.
_EXPAND = np.zeros((12, 8))
_EXPAND[:6, :2] = [[1, 0], [0, 1], [-1, 1], [-.5, -.5], [1, -.5], [-.5, 1]]
_EXPAND[6:, 2:] = np.eye(6)
_TERRITORIES = np.eye(3)[[2, 1, 0]]  # Anterior (+z), inferior (+y), lateral.
_LATERAL_INFERIOR = np.array([0.7, 0.6, 0.]) / np.hypot(0.7, 0.6)


@dataclasses.dataclass
class _Heart:
  """Wave table: one row per wave (P, Q, R, S, R', ST, T)."""
  offset: np.ndarray       # [W] offsets from the R peak (s, at RR = 1 s).
  width: np.ndarray        # [W] widths (s).
  vector: np.ndarray       # [W, 3] direction times amplitude (mV).


@dataclasses.dataclass
class _Record:
  """Continuous-time parameters of one record (everything but sample noise)."""
  labels: np.ndarray       # [5] multi-hot.
  heart: _Heart
  beats: np.ndarray        # [B] R-peak times (s).
  rr: np.ndarray           # [B] RR interval preceding each beat (s).
  gain: np.ndarray         # [B] respiratory amplitude modulation.
  wander: np.ndarray       # [3, K, 8] frequency, amplitude, phase.
  bursts: np.ndarray       # [N, 3] EMG bursts: start, duration, amplitude.
  powerline: np.ndarray    # [3] frequency, amplitude, phase.
  noise_sd: float


def _unit(v: np.ndarray) -> np.ndarray:
  """Normalises vectors along the last axis."""
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _invert_along(v: np.ndarray, u: np.ndarray, frac: float) -> np.ndarray:
  """Reverses a fraction `frac` of the positive component of `v` along `u`."""
  return v - 2 * frac * max(float(v @ u), 0.) * u


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
  """Random rotation: product of rotations about x, y, z of up to max_deg."""
  out = np.eye(3)
  for axis, a in enumerate(np.deg2rad(rng.uniform(-max_deg, max_deg, 3))):
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[[i, i, j, j], [i, j, i, j]] = [np.cos(a), -np.sin(a), np.sin(a),
                                       np.cos(a)]
    out = rot @ out
  return out


def _normal_heart(rng: np.random.Generator) -> _Heart:
  """Wave table of a normal heart, with normal inter-individual variation."""
  # Rows: P, Q (septal), R, S, R' (absent), ST (early repolarisation), T.
  pr, qrs, qt = rng.uniform([0.12, 0.85, 0.9], [0.2, 1.15, 1.1])
  offset = np.array([-pr, -0.028 * qrs, 0., 0.027 * qrs, 0.05 * qrs,
                     0.13 * qt, 0.29 * qt])
  width = np.array([0.022, 0.008 * qrs, 0.011 * qrs, 0.011 * qrs, 0.014 * qrs,
                    0.075 * qt, 0.05 * qt])
  amp = np.array([rng.uniform(0.1, 0.2), rng.uniform(0.1, 0.25),
                  rng.uniform(1.1, 1.8), rng.uniform(0.3, 0.7), 0.,
                  rng.normal(0., 0.03), rng.uniform(0.25, 0.5)])
  dirs = _unit(_BASE_DIRS + rng.normal(0., 0.1, _BASE_DIRS.shape))
  return _Heart(offset, width, amp[:, None] * dirs)


def _apply_mi(rng: np.random.Generator, s: float, heart: _Heart) -> None:
  """MI: Q waves and R loss away from, ST elevation towards, a territory."""
  u, vec = _TERRITORIES[rng.choice(3, p=[0.4, 0.4, 0.2])], heart.vector
  vec[_Q] -= s * rng.uniform(0.3, 0.7) * u
  vec[_R] = _invert_along(vec[_R], u, 0.35 * s)
  vec[_ST] += s * rng.uniform(0.15, 0.35) * u
  if rng.random() < 0.5:
    vec[_T] = _invert_along(vec[_T], u, s)


def _apply_sttc(rng: np.random.Generator, s: float, heart: _Heart) -> None:
  """STTC: lateral-inferior ST depression and flattened or inverted T."""
  vec = heart.vector
  vec[_ST] -= s * rng.uniform(0.08, 0.2) * _LATERAL_INFERIOR
  vec[_T] *= 1 - 1.6 * s * rng.uniform(0.7, 1.)


def _apply_cd(rng: np.random.Generator, s: float, heart: _Heart) -> None:
  """CD: wide QRS with a late R' (RBBB or LBBB-like), maybe 1st-degree AVB."""
  factor = 1 + s * rng.uniform(0.6, 1.5)
  heart.offset[_Q:_ST] *= factor
  heart.width[_Q:_ST] *= factor
  bbb = [-0.5, 0.1, 0.85] if rng.random() < 0.5 else [0.8, 0.1, -0.6]
  heart.vector[_RP] = s * rng.uniform(0.3, 0.9) * _unit(np.array(bbb))
  if rng.random() < 0.4:
    heart.offset[_P] -= s * rng.uniform(0.06, 0.14)


def _apply_hyp(rng: np.random.Generator, s: float, heart: _Heart) -> None:
  """HYP: LVH-like high, leftward-posterior QRS voltage, maybe strain."""
  vec = heart.vector
  vec[_R:_RP] *= 1 + s * rng.uniform(0.5, 1.2)
  left_posterior = _unit(np.array([0.5, 0., -0.85]))
  r = np.linalg.norm(vec[_R])
  vec[_R] = r * _unit(vec[_R] / r + 0.5 * s * left_posterior)
  if rng.random() < 0.4:
    vec[_T] = _invert_along(vec[_T], _TERRITORIES[2], s)
    vec[_ST] -= 0.1 * s * _TERRITORIES[2]


_PATHOLOGIES = (_apply_mi, _apply_sttc, _apply_cd, _apply_hyp)


def _beat_times(rng: np.random.Generator,
                duration_s: float) -> tuple[np.ndarray, ...]:
  """R-peak times with RR jitter, respiratory sinus arrhythmia and gain."""
  rr0 = 60. / rng.uniform(50., 110.)
  resp_f, phase = rng.uniform(0.15, 0.4), rng.uniform(0, 2 * np.pi)
  rsa, jitter = rng.uniform(0.01, 0.06), rng.uniform(0.005, 0.03)
  n = int(np.ceil((duration_s + 1.) / (0.75 * rr0))) + 4
  resp = np.sin(phase + 2 * np.pi * resp_f * rr0 * np.arange(n))
  rr = rr0 * (1 + rsa * resp + jitter * rng.standard_normal(n))
  beats = np.cumsum(rr) - rng.uniform(1.5, 2.5) * rr0
  keep = beats < duration_s + 0.5
  return beats[keep], rr[keep], (1 + 0.05 * resp)[keep]


def _draw_artifacts(rng: np.random.Generator,
                    duration_s: float) -> tuple[np.ndarray | float, ...]:
  """Baseline wander, EMG burst, powerline and white-noise parameters."""
  wander = np.stack([rng.uniform(0.05, 0.5, (3, 8)),
                     rng.uniform(0., 0.08, (3, 8)) * rng.uniform(0.2, 1.5),
                     rng.uniform(0, 2 * np.pi, (3, 8))])
  n_bursts = rng.integers(1, 4) if rng.random() < 0.3 else 0
  bursts = np.stack([rng.uniform(0, duration_s, n_bursts),
                     rng.uniform(0.3, 1.5, n_bursts),
                     rng.uniform(0.02, 0.1, n_bursts)], -1)
  powerline = np.array([rng.choice([50., 60.]), rng.uniform(0., 0.03),
                        rng.uniform(0, 2 * np.pi)])
  return wander, bursts, powerline, rng.uniform(0.005, 0.03)


def _draw_record(rng: np.random.Generator, duration_s: float) -> _Record:
  """Draws all continuous-time parameters of one record."""
  present = rng.random(4) < np.array(list(PREVALENCE.values()))
  heart = _normal_heart(rng)
  for apply, is_present in zip(_PATHOLOGIES, present):
    if is_present:  # Severity: Beta(1.2, 2), often subtle.
      apply(rng, rng.beta(1.2, 2.), heart)
  # Per-record heart axis rotation and body-habitus amplitude scale.
  heart.vector = np.exp(np.clip(rng.normal(0., 0.2), -0.5, 0.5)) * (
      heart.vector @ _rotation(rng, 20.).T)
  labels = np.concatenate([[not present.any()], present]).astype(np.float32)
  return _Record(labels, heart, *_beat_times(rng, duration_s),
                 *_draw_artifacts(rng, duration_s))


def _dipole(rec: _Record, t: np.ndarray) -> np.ndarray:
  """Heart vector H(t) [T, 3] as a sum of per-beat, per-wave bumps.

  Each sample only sees the 2 beats before and after it (the waves of a beat
  span < 1.1 s and RR > 0.45 s); far padding beats contribute exactly 0.
  """
  beats, rr, gain = (np.pad(a, 2, constant_values=v) for a, v in (
      (rec.beats, 1e4), (rec.rr, 1.), (rec.gain, 0.)))
  beats[:2] *= -1
  near = np.searchsorted(beats, t)[:, None] + np.arange(-2, 2)   # [T, 4]
  scale = np.where(_REPOL, np.sqrt(rr[near])[..., None], 1.)     # Bazett.
  heart = rec.heart
  x = (t[:, None, None] - beats[near][..., None] - heart.offset * scale) / (
      heart.width * scale)                                        # [T, 4, W]
  x2 = x * x
  x2[..., _ST] **= 3  # Flat-topped ST plateau.
  bumps = np.zeros_like(x2)
  live = x2 < 60.  # exp(-30) ~ 1e-13: skip the slow exp of negligible terms.
  bumps[live] = np.exp(-0.5 * x2[live])
  bumps = np.einsum("tbw,tb->tw", bumps, gain[near])
  return bumps @ heart.vector


def _noise(rec: _Record, rng: np.random.Generator, t: np.ndarray,
           sampling_rate: int) -> np.ndarray:
  """Baseline wander, white noise, EMG bursts and (500 Hz) powerline [T, 8]."""
  freq, scale, phase = rec.wander
  out = np.einsum("tkc,kc->tc", np.sin(
      2 * np.pi * freq * t[:, None, None] + phase), scale)
  start, dur, amp = rec.bursts.T
  env = rec.noise_sd + np.sin(
      np.pi * np.clip((t[:, None] - start) / dur, 0, 1)) ** 2 @ amp
  out += env[:, None] * rng.standard_normal((t.size, 8))
  if sampling_rate == 500:
    f, a, ph = rec.powerline
    out += a * np.sin(2 * np.pi * f * t + ph)[:, None]
  return out


def _validate(sampling_rate: int, duration_s: float, **indices: int) -> None:
  """Raises ValueError naming the offending argument."""
  if sampling_rate not in SAMPLING_RATES:
    raise ValueError(f"sampling_rate must be one of {SAMPLING_RATES}, "
                     f"got {sampling_rate!r}.")
  n_100 = duration_s * 100
  if not n_100 > 0 or abs(n_100 - round(n_100)) > 1e-6:
    raise ValueError(f"duration_s must be a positive multiple of 0.01 s, "
                     f"got {duration_s!r}.")
  for name, value in indices.items():
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}.")


def generate_record(seed: int, index: int, *, sampling_rate: int = 100,
                    duration_s: float = 10.0,
                    noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Returns (ecg float32 [T, 12] in mV, labels float32 [5] multi-hot).

  `noise=False` returns the clean dipole projection (no wander, noise, EMG
  or powerline), e.g. to check the lead identities or sampling consistency.
  """
  _validate(sampling_rate, duration_s, seed=seed, index=index)
  rng = np.random.default_rng([seed, index])
  rec = _draw_record(rng, duration_s)
  t = np.arange(round(duration_s * sampling_rate)) / sampling_rate
  leads = _dipole(rec, t) @ _LEAD_VECTORS.T
  if noise:
    leads += _noise(rec, rng, t, sampling_rate)
  return (leads @ _EXPAND.T).astype(np.float32), rec.labels


def generate(seed: int, n: int, *, start: int = 0, sampling_rate: int = 100,
             duration_s: float = 10.0,
             noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Stacks records start..start+n-1: (ecg [n, T, 12], labels [n, 5])."""
  _validate(sampling_rate, duration_s, seed=seed, n=n, start=start)
  t = round(duration_s * sampling_rate)
  records = [generate_record(seed, i, sampling_rate=sampling_rate,
                             duration_s=duration_s, noise=noise)
             for i in range(start, start + n)]
  if not records:
    return np.zeros((0, t, 12), np.float32), np.zeros((0, 5), np.float32)
  ecgs, labels = zip(*records)
  return np.stack(ecgs), np.stack(labels)
