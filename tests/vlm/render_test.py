"""Tests of evl_ecg_jax.vlm.render: layout geometry, grid, traces, inputs."""

from __future__ import annotations


import numpy as np
import pytest

from evl_ecg_jax.vlm import render as R

SPEC = R.RenderSpec()
PX = SPEC.px_per_mm  # 2 px/mm, margin 2 mm = 4 px.


def _zeros(fs, batch=()):
  """A flat record of shape batch + [10 fs, 12]."""
  return np.zeros(tuple(batch) + (10 * fs, 12), np.float32)


def _sine(fs, hz=1.0, mv=1.0):
  """A sine of `hz` Hz and amplitude `mv` over 10 s at fs."""
  return mv * np.sin(2 * np.pi * hz * np.arange(10 * fs) / fs)


def _trace(image):
  """Pixels in the (black) trace colour."""
  return image == 0


def _band(row):
  """Pixel rows [top, bottom) of layout row `row` (0-3) at SPEC."""
  top = int(round((SPEC.margin_mm + row * SPEC.row_mm) * PX))
  return top, int(round(top + SPEC.row_mm * PX))


def _col(t):
  """Pixel column of time t (s) at SPEC."""
  return int(np.floor(R.to_pixel("I", t, 0)[1] + 0.5))


@pytest.mark.parametrize("fs", [100, 500])
def test_shape_and_dtype(fs):
  assert R.image_shape() == (328, 508)
  image = R.render(_zeros(fs), fs)
  assert image.shape == (328, 508) and image.dtype == np.uint8
  batch = R.render(_zeros(fs, (3,)), fs)
  assert batch.shape == (3, 328, 508)
  np.testing.assert_array_equal(batch[1], image)
  spec = R.RenderSpec(channels=3, dtype="float32", px_per_mm=1.0)
  rgb = R.render(_zeros(fs, (2,)), fs, spec=spec)
  assert rgb.shape == (2, 164, 254, 3) and rgb.dtype == np.float32
  assert R.image_shape(spec) == (164, 254, 3)
  assert 0.0 <= rgb.min() and rgb.max() <= 1.0


def test_zero_signal_traces_only_the_baselines():
  for fs in (100, 500):
    trace = _trace(R.render(_zeros(fs), fs))
    expected = np.zeros_like(trace)
    for row, lead in enumerate(["I", "II", "III", "II"]):
      y = R.to_pixel(lead, 0.0, 0.0, rhythm=row == 3)[0]
      assert y == (SPEC.margin_mm + (row + 0.5) * SPEC.row_mm) * PX
      expected[int(y), _col(0.0):_col(10 - 1 / fs) + 1] = True
    np.testing.assert_array_equal(trace, expected)


@pytest.mark.parametrize("px_per_mm", [2.0, 4.0])
def test_constant_one_millivolt_sits_ten_mm_above_baseline(px_per_mm):
  spec = R.RenderSpec(px_per_mm=px_per_mm)
  signal = _zeros(500)
  signal[:, R.LEADS.index("V2")] = 1.0  # row 1, column 2: 5-7.5 s.
  trace = _trace(R.render(signal, 500, spec=spec))
  base = R.to_pixel("V2", 6.0, 0.0, spec)[0]
  y = R.to_pixel("V2", 6.0, 1.0, spec)[0]
  assert base - y == 10 * px_per_mm
  cols = np.floor(R.to_pixel("V2", np.array([5.05, 7.45]), 0, spec)[1]
                  + 0.5).astype(int)
  top, bottom = (np.array([1, 2]) * spec.row_mm + spec.margin_mm) * px_per_mm
  band = trace[int(top):int(bottom), cols[0]:cols[1]]
  rows = np.nonzero(band.any(axis=1))[0] + int(top)
  np.testing.assert_array_equal(rows, [int(y)])
  assert band.any(axis=0).all()


def test_spike_and_steep_slopes_are_continuous():
  signal = _zeros(500)
  signal[500, 0] = 1.5  # one-sample 1.5 mV spike at 1 s in lead I.
  signal[:, R.LEADS.index("V4")] = _sine(500, hz=15.0, mv=1.5)
  trace = _trace(R.render(signal, 500))
  base = int(R.to_pixel("I", 1.0, 0.0)[0])
  top = int(R.to_pixel("I", 1.0, 1.5)[0])
  assert base - top == 30
  column = trace[top:base + 1, _col(1.0) - 1:_col(1.0) + 2].any(axis=1)
  assert column.all()
  lo_band, hi_band = _band(0)
  band = trace[lo_band:hi_band, _col(7.5) + 1:_col(10 - 1 / 500)]
  assert band.any(axis=0).all()
  rows = np.arange(lo_band, hi_band)[:, None]
  lo = np.where(band, rows, 10**6).min(axis=0)
  hi = np.where(band, rows, -1).max(axis=0)
  np.testing.assert_array_equal(band.sum(axis=0), hi - lo + 1)  # no holes.
  assert (lo[1:] <= hi[:-1] + 1).all() and (lo[:-1] <= hi[1:] + 1).all()


@pytest.mark.parametrize("rhythm_lead", ["II", "V1"])
def test_rhythm_strip_follows_its_lead_across_the_width(rhythm_lead):
  spec = R.RenderSpec(rhythm_lead=rhythm_lead)
  signal = _zeros(500)
  signal[:, R.LEADS.index(rhythm_lead)] = _sine(500, hz=0.7, mv=1.0)
  signal[:, R.LEADS.index("I")] = _sine(500, hz=2.0, mv=1.0)  # not shown.
  trace = _trace(R.render(signal, 500, spec=spec))
  top, bottom = _band(3)
  band = trace[top:bottom, _col(0.0):_col(10 - 1 / 500) + 1]
  assert band.any(axis=0).all()
  rows = np.arange(top, bottom)[:, None]
  centre = (rows * band).sum(axis=0) / band.sum(axis=0)
  t = (np.arange(band.shape[1]) + _col(0.0) - SPEC.margin_mm * PX) / (25 * PX)
  want = R.to_pixel(rhythm_lead, t, _sine(500, 0.7, 1.0)[
      np.minimum(np.rint(t * 500).astype(int), 4999)], spec, rhythm=True)[0]
  assert np.abs(centre - want).max() <= 1.0


@pytest.mark.parametrize("px_per_mm", [2.0, 3.0])
def test_grid_lines_at_one_and_five_mm(px_per_mm):
  spec = R.RenderSpec(px_per_mm=px_per_mm)
  image = R.render(_zeros(100), 100, spec=spec)
  luma = lambda c: int(round(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]))
  bold, fine = luma(spec.grid_color), luma(spec.fine_grid_color)
  margin = spec.margin_mm * px_per_mm
  row = int(margin + 0.5 * px_per_mm + 0.5)  # between two 1-mm lines.
  kinds = np.full(image.shape[1], 255)
  for k in range(251):
    kinds[int(np.floor(margin + k * px_per_mm + 0.5))] = (
        bold if k % 5 == 0 else fine)
  np.testing.assert_array_equal(image[row], kinds)
  col = int(margin + 0.5 * px_per_mm + 0.5)
  kinds = np.full(image.shape[0], 255)
  for k in range(4 * int(spec.row_mm) + 1):
    kinds[int(np.floor(margin + k * px_per_mm + 0.5))] = (
        bold if k % 5 == 0 else fine)
  baselines = [int(R.to_pixel("I", 0, 0, spec)[0] + spec.row_mm * px_per_mm
                   * r) for r in range(4)]
  kinds[baselines] = 0  # the flat traces cross this column.
  np.testing.assert_array_equal(image[:, col], kinds)


def test_100_and_500_hz_give_nearly_the_same_image():
  slow = np.stack([_sine(500, hz=1.0 + 0.2 * i, mv=0.8) for i in range(12)],
                  axis=-1)
  a = R.render(slow[::5], 100)
  b = R.render(slow, 500)
  assert (a != b).mean() < 0.005
  assert np.abs(_trace(a).sum() - _trace(b).sum()) < 0.02 * _trace(b).sum()


def test_deterministic_and_perturbations_are_seeded():
  signal = np.random.default_rng(0).normal(0, 0.3, (1000, 12))
  image = R.render(signal, 100)
  np.testing.assert_array_equal(image, R.render(signal, 100))
  one = R.perturb(image, np.random.default_rng(1))
  np.testing.assert_array_equal(one, R.perturb(image, np.random.default_rng(1)))
  assert one.shape == image.shape and one.dtype == image.dtype
  assert not np.array_equal(one, R.perturb(image, np.random.default_rng(2)))
  spec = R.random_spec(np.random.default_rng(3), R.RenderSpec(channels=3))
  assert spec == R.random_spec(np.random.default_rng(3),
                               R.RenderSpec(channels=3))
  rgb = R.perturb(R.render(signal, 100, spec=spec), np.random.default_rng(4),
                  max_rotation_deg=3.0)
  assert rgb.shape == (328, 508, 3) and rgb.dtype == np.uint8


def test_line_width_thickens_the_trace():
  trace = _trace(R.render(_zeros(100), 100,
                          spec=R.RenderSpec(line_width=3)))
  base = int(R.to_pixel("I", 0, 0)[0])
  assert set(np.nonzero(trace[:, 100])[0]) >= {base - 1, base, base + 1}
  assert trace[:, 100].sum() == 12


@pytest.mark.parametrize("shape,fs,match", [
    ((1000, 8), 100, "12 leads"),
    ((5000, 12), 100, "1000 samples"),
    ((2, 3, 1000, 12), 100, r"\[B, T, 12\]"),
])
def test_bad_input_raises(shape, fs, match):
  with pytest.raises(ValueError, match=match):
    R.render(np.zeros(shape), fs)


def test_nan_and_unknown_lead_raise():
  signal = _zeros(100)
  signal[10, 3] = np.nan
  with pytest.raises(ValueError, match="finite"):
    R.render(signal, 100)
  with pytest.raises(ValueError, match="one of"):
    R.to_pixel("V7", 0.0, 0.0)
  with pytest.raises(ValueError, match="rhythm strip"):
    R.to_pixel("I", 0.0, 0.0, rhythm=True)
  with pytest.raises(ValueError, match="fs >= 1"):
    R.render(signal, 0)
  with pytest.raises(ValueError, match="channels 1 or 3"):
    R.RenderSpec(channels=2)


def test_plot_writes_png(tmp_path):
  path = tmp_path / "ecg.png"
  R.plot(_sine(100)[:, None] * np.ones(12), 100, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
