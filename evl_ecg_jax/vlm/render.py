"""12-lead ECGs rendered as standard clinical printouts (VLM image input).

`render` draws [T, 12] or [B, T, 12] mV records (leads I, II, III, aVR, aVL,
aVF, V1..V6) on ECG paper at 25 mm/s and 10 mm/mV: 3 x 4 panels of 2.5 s
(rows I aVR V1 V4 / II aVL V2 V5 / III aVF V3 V6; column c shows
[2.5c, 2.5c + 2.5) s) over a 10-s lead II rhythm strip. It is vectorised
numpy: a batch of 32 default records takes ~50 ms on one CPU core. The
default `RenderSpec` gives uint8 [328, 508] grayscale images. `to_pixel` is
the layout geometry; `random_spec`/`perturb` add seeded paper-like looks;
`plot` draws a matplotlib figure for people.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF",
         "V1", "V2", "V3", "V4", "V5", "V6")
LAYOUT = (("I", "aVR", "V1", "V4"),
          ("II", "aVL", "V2", "V5"),
          ("III", "aVF", "V3", "V6"))
SECONDS, PANEL_S, MM_PER_S, MM_PER_MV = 10.0, 2.5, 25.0, 10.0
PAPER_MM = SECONDS * MM_PER_S  # 250 mm of paper across.
Color = Tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """How a record is drawn; the defaults give a uint8 [328, 508] image.

  Attributes:
    px_per_mm: resolution; image width is ceil((250 + 2 margin) px_per_mm).
    row_mm: height of each of the 4 row bands (baseline at its centre);
      traces are clipped to their band (±row_mm/20 mV).
    margin_mm: blank paper around the grid on every side.
    line_width: trace thickness in pixels.
    fine_grid: whether to draw the 1-mm lines (5-mm lines always drawn).
    grid_color: RGB of the bold 5-mm lines.
    fine_grid_color: RGB of the fine 1-mm lines.
    trace_color: RGB of the traces.
    background: RGB of the paper.
    rhythm_lead: lead of the 10-s strip in the bottom row.
    channels: 1 (grayscale [H, W], ITU-R 601 luma) or 3 ([H, W, 3]).
    dtype: "uint8" (0..255) or "float32" (0..1).
  """
  px_per_mm: float = 2.0
  row_mm: float = 40.0
  margin_mm: float = 2.0
  line_width: int = 1
  fine_grid: bool = True
  grid_color: Color = (235, 120, 120)
  fine_grid_color: Color = (250, 205, 205)
  trace_color: Color = (0, 0, 0)
  background: Color = (255, 255, 255)
  rhythm_lead: str = "II"
  channels: int = 1
  dtype: str = "uint8"

  def __post_init__(self):
    """Rejects settings `render` cannot honour."""
    if (self.channels not in (1, 3) or self.dtype not in ("uint8", "float32")
        or self.line_width < 1 or self.px_per_mm <= 0 or self.row_mm <= 0):
      raise ValueError(f"RenderSpec: need channels 1 or 3, dtype uint8 or "
                       f"float32, line_width >= 1 and positive sizes: {self}.")


def image_shape(spec: RenderSpec = RenderSpec()) -> Tuple[int, ...]:
  """The (H, W) or (H, W, 3) shape of one rendered record."""
  hw = (int(np.ceil((4 * spec.row_mm + 2 * spec.margin_mm) * spec.px_per_mm)),
        int(np.ceil((PAPER_MM + 2 * spec.margin_mm) * spec.px_per_mm)))
  return hw if spec.channels == 1 else hw + (3,)


def to_pixel(lead: str, t, mv, spec: RenderSpec = RenderSpec(), *,
             rhythm: bool = False):
  """Maps (lead, time s, value mV) to float (row, column) pixel positions.

  Pixel k's centre is at k. Time maps to the same column in every row
  (25 mm/s from the grid's left edge); a panel lead is only drawn at times
  in its column's window. `rhythm=True` places `spec.rhythm_lead` on the
  bottom strip. `t` and `mv` broadcast.
  """
  if rhythm:
    if lead != spec.rhythm_lead:
      raise ValueError(f"to_pixel: the rhythm strip shows "
                       f"{spec.rhythm_lead!r}, not {lead!r}.")
    row = 3
  else:
    rows = [r for r, names in enumerate(LAYOUT) if lead in names]
    if not rows:
      raise ValueError(f"to_pixel: lead must be one of {LEADS}, got {lead!r}.")
    row = rows[0]
  baseline_mm = spec.margin_mm + (row + 0.5) * spec.row_mm
  y = (baseline_mm - MM_PER_MV * np.asarray(mv, np.float64)) * spec.px_per_mm
  x = (spec.margin_mm + MM_PER_S * np.asarray(t, np.float64)) * spec.px_per_mm
  return y, x


def _round(x):
  """Rounds half up to an integer array (pixel k covers [k - .5, k + .5))."""
  return np.floor(np.asarray(x) + 0.5).astype(np.int64)


def _palette(spec: RenderSpec) -> np.ndarray:
  """[4(, 3)] colours in spec.dtype: paper, fine grid, bold grid, trace."""
  rgb = np.array([spec.background, spec.fine_grid_color, spec.grid_color,
                  spec.trace_color], np.float64)
  if spec.channels == 1:
    rgb = rgb @ np.array([0.299, 0.587, 0.114])
  if spec.dtype == "float32":
    return (rgb / 255.0).astype(np.float32)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _grid_index(spec: RenderSpec) -> np.ndarray:
  """[H, W] palette index of the empty paper (0 paper, 1 fine, 2 bold)."""
  h, w = image_shape(spec)[:2]

  def lines(n_mm, size):
    kind = np.zeros(size, np.int8)
    mm = np.arange(int(round(n_mm)) + 1)
    pos = _round((spec.margin_mm + mm) * spec.px_per_mm)
    ok = pos < size
    kind[pos[ok]] = np.where(mm[ok] % 5 == 0, 2, int(spec.fine_grid))
    return kind, pos[0], pos[-1]

  rows, top, bottom = lines(4 * spec.row_mm, h)
  cols, left, right = lines(PAPER_MM, w)
  grid = np.zeros((h, w), np.int8)
  grid[top:bottom + 1, left:right + 1] = np.maximum(
      rows[top:bottom + 1, None], cols[None, left:right + 1])
  return grid


def _column_ranges(y: np.ndarray, x: np.ndarray, line_width: int):
  """Pixel columns and the row range [lo, hi] the polyline covers in each.

  y [..., N] are float rows of samples at uniformly spaced float columns
  x [N]. Over a column's span [k - .5, k + .5) a polyline reaches its
  extremes at the span's ends or at vertices inside, so those bound it.
  Returns (cols [K], lo [..., K], hi [..., K]) as ints.
  """
  n, x0, dx = len(x), x[0], x[1] - x[0]
  cols = np.arange(_round(x0), _round(x[-1]) + 1)

  def at(xq):  # linear interpolation, clamped to the ends.
    u = np.clip((xq - x0) / dx, 0, n - 1)
    i = np.minimum(np.floor(u).astype(np.int64), n - 2)
    return y[..., i] * (i + 1 - u) + y[..., i + 1] * (u - i)

  left, right = at(cols - 0.5), at(cols + 0.5)
  first = np.ceil((cols - 0.5 - x0) / dx).astype(np.int64)
  idx = first[:, None] + np.arange(int(np.ceil(1 / dx)) + 1)
  inside = (idx >= 0) & (idx < n) & (x0 + idx * dx < cols[:, None] + 0.5)
  ys = np.where(inside, y[..., np.clip(idx, 0, n - 1)], left[..., None])
  lo = np.minimum(np.minimum(left, right), ys.min(-1))
  hi = np.maximum(np.maximum(left, right), ys.max(-1))
  half = (line_width - 1) / 2
  if line_width > 1:  # widen sideways: extremes over neighbouring columns.
    pad = [(0, 0)] * (lo.ndim - 1) + [((line_width - 1) // 2,
                                       line_width // 2)]
    view = np.lib.stride_tricks.sliding_window_view
    lo = view(np.pad(lo, pad, mode="edge"), line_width, -1).min(-1)
    hi = view(np.pad(hi, pad, mode="edge"), line_width, -1).max(-1)
  return cols, _round(lo - half), _round(hi + half)


def _check(signal, fs: float) -> np.ndarray:
  """Validates a [T, 12] / [B, T, 12] finite mV record sampled at fs."""
  signal = np.asarray(signal, np.float64)
  if not fs >= 1:
    raise ValueError(f"render: expected a sampling rate fs >= 1 Hz, got {fs}.")
  samples = int(round(SECONDS * fs))
  if signal.ndim not in (2, 3) or signal.shape[-1] != len(LEADS):
    raise ValueError(f"render: expected [T, 12] or [B, T, 12] (12 leads "
                     f"{', '.join(LEADS)}), got shape {signal.shape}.")
  if signal.shape[-2] != samples:
    raise ValueError(f"render: expected a 10-s record, T = 10 * fs = "
                     f"{samples} samples at fs={fs}, got {signal.shape[-2]}.")
  if not np.isfinite(signal).all():
    raise ValueError("render: expected finite values (no NaN/inf).")
  return signal


def render(signal, fs: float, *,
           spec: RenderSpec = RenderSpec()) -> np.ndarray:
  """[T, 12] or [B, T, 12] mV at fs Hz -> image(s) [(B,) *image_shape(spec)]."""
  signal = _check(signal, fs)
  batch = signal.reshape((-1,) + signal.shape[-2:])  # [B, T, 12]
  b, samples = batch.shape[:2]
  h, w = image_shape(spec)[:2]
  t = np.arange(samples) / fs
  strips = []  # (first sample, end sample, [(lead, rhythm)]) per column.
  for c in range(4):
    window = np.ceil(np.array([c, c + 1]) * PANEL_S * fs - 1e-9).astype(int)
    strips.append((*window, [(LAYOUT[r][c], False) for r in range(3)]))
  strips.append((0, samples, [(spec.rhythm_lead, True)]))
  clip_mv = spec.row_mm / 2 / MM_PER_MV  # a band spans baseline ± clip_mv.
  trace = np.zeros((b, h, w), bool)
  for start, end, rows in strips:
    y = np.stack([to_pixel(lead, 0, batch[:, start:end, LEADS.index(lead)],
                           spec, rhythm=rhythm)[0] for lead, rhythm in rows],
                 axis=1)  # [B, rows, n]
    x = to_pixel("I", t[start:end], 0, spec)[1]
    cols, lo, hi = _column_ranges(y, x, spec.line_width)
    keep = (cols >= 0) & (cols < w)
    for j, (lead, rhythm) in enumerate(rows):
      top, bottom = _round(to_pixel(lead, 0, [clip_mv, -clip_mv], spec,
                                    rhythm=rhythm)[0])
      top, bottom = max(top, 0), min(bottom, h)
      band = np.arange(top, bottom)[None, :, None]
      lo_j, hi_j = lo[:, j][:, None, keep], hi[:, j][:, None, keep]
      trace[:, top:bottom, cols[keep]] |= (band >= lo_j) & (band <= hi_j)
  image = _palette(spec)[np.where(trace, 3, _grid_index(spec)[None])]
  return image.reshape(signal.shape[:-2] + image.shape[1:])


def random_spec(rng: np.random.Generator,
                base: RenderSpec = RenderSpec()) -> RenderSpec:
  """`base` with a random grid tint (pink, red or gray) and line width 1-2."""
  tint = rng.integers(3)
  strength = rng.uniform(0.6, 1.0)
  bold = {0: (240, 150, 170), 1: (225, 90, 90), 2: (150, 150, 150)}[int(tint)]
  bold = tuple(int(255 - strength * (255 - v)) for v in bold)
  fine = tuple(int(255 - 0.4 * (255 - v)) for v in bold)
  return dataclasses.replace(base, grid_color=bold, fine_grid_color=fine,
                             line_width=int(rng.integers(1, 3)))


def perturb(image: np.ndarray, rng: np.random.Generator, *,
            max_rotation_deg: float = 2.0, noise_std: float = 0.03,
            brightness: float = 0.1) -> np.ndarray:
  """Scanned-paper look: rotation, brightness shift, Gaussian noise.

  Takes one uint8 or float32 image [H, W] or [H, W, 3] as `render` makes
  it; `noise_std` and `brightness` are fractions of full scale. Returns the
  same shape and dtype; deterministic given `rng`'s state.
  """
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  scale = 255.0 if image.dtype == np.uint8 else 1.0
  x = image.astype(np.float32) / scale
  angle = rng.uniform(-max_rotation_deg, max_rotation_deg)
  x = scipy.ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1,
                           mode="nearest")
  x = x + rng.uniform(-brightness, brightness)
  x = np.clip(x + rng.normal(0.0, noise_std, x.shape), 0.0, 1.0)
  if image.dtype == np.uint8:
    return np.rint(x * 255).astype(np.uint8)
  return x.astype(image.dtype)


def plot(signal, fs: float, path: Optional[str] = None, *,
         calibration: bool = True):
  """A matplotlib (Agg) printout of one [T, 12] record; saves a PNG at path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  signal = _check(signal, fs)
  if signal.ndim != 2:
    raise ValueError(f"plot: expected one [T, 12] record, got {signal.shape}.")
  mm = RenderSpec(px_per_mm=1.0, margin_mm=0.0)  # to_pixel in mm.
  height, left = 4 * mm.row_mm, -10.0 if calibration else 0.0
  fig = FigureCanvasAgg(Figure(figsize=((PAPER_MM - left) / 42,
                                        height / 42))).figure  # 0.6 scale.
  ax = fig.add_axes((0, 0, 1, 1))
  for step, color, lw in ((1, "#fbd5d5", 0.3), (5, "#f08080", 0.6)):
    ax.vlines(np.arange(0, PAPER_MM + 1, step), 0, height, colors=color,
              lw=lw, zorder=0)
    ax.hlines(np.arange(0, height + 1, step), 0, PAPER_MM, colors=color,
              lw=lw, zorder=0)
  t = np.arange(signal.shape[0]) / fs
  panels = [(LAYOUT[r][c], c * PANEL_S, (c + 1) * PANEL_S, False)
            for r in range(3) for c in range(4)]
  for lead, t0, t1, rhythm in panels + [(mm.rhythm_lead, 0, SECONDS, True)]:
    sel = (t >= t0) & (t < t1)
    y, x = to_pixel(lead, t[sel], signal[sel, LEADS.index(lead)], mm,
                    rhythm=rhythm)
    y0 = to_pixel(lead, 0, 0, mm, rhythm=rhythm)[0]
    ax.plot(x, y, color="k", lw=0.6)
    ax.text(x[0] + 1, y0 - 0.5 * mm.row_mm + 4, lead, fontsize=7)
    if calibration and t0 == 0:
      ax.plot([-8, -7, -7, -4, -4, -3], y0 - np.array([0, 0, 10, 10, 0, 0]),
              color="k", lw=0.6)
  ax.set_xlim(left, PAPER_MM)
  ax.set_ylim(height, 0)
  ax.axis("off")
  if path is not None:
    fig.savefig(path, dpi=150)
  return fig
