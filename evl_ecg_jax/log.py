"""Metric writers: JSONL + TensorBoard (tensorboardX), process 0 only."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a",
                       encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
