"""Metric writers: JSONL + TensorBoard (tensorboardX), process 0 only.

A workdir may be a URL (gs://...; the [tpu] extra installs the GCS
clients): object stores cannot append, so there the JSONL is rewritten
whole at each write (a few thousand lines at most).
"""

from __future__ import annotations

import json
import math

from etils import epath
import jax


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._path = root / "metrics.jsonl"
    self._remote = "://" in workdir
    self._lines = (self._path.read_text().splitlines(keepends=True)
                   if self._remote and self._path.exists() else [])
    self._jsonl = None if self._remote else open(self._path, "a",
                                                 encoding="utf-8")
    self._tb = SummaryWriter(str(root / "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self._remote:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tb.close()
