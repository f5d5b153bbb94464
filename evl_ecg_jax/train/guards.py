"""Run guards: preemption notices and non-finite steps (used by train/loop.py)."""

from __future__ import annotations

import signal
import threading

from absl import logging
import numpy as np


class Preempted(Exception):
  """Raised after the checkpoint of a preempted run is written (exit 0)."""


class PreemptionNotice:
  """SIGTERM (a TPU VM's preemption notice) -> stop at the next step
  boundary. Only the main thread can install handlers; elsewhere this is a
  no-op."""

  def __init__(self):
    self._flag = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return lambda: self._flag

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
  """Counts steps the train step skipped (non-finite loss or gradients).

  Each one is logged with its batch's record ids; `max_consecutive` in a
  row stop the run with FloatingPointError before anything else is saved,
  so the last checkpoint holds the last good state.
  """

  def __init__(self, max_consecutive: int):
    self.max_consecutive = max_consecutive
    self.total = 0
    self.consecutive = 0

  def check_all(self, pending: list) -> None:
    """Checks and empties a list of (step, finite flag, batch ids)."""
    for item in pending:
      self.check(*item)
    pending.clear()

  def check(self, step: int, finite, ids) -> None:
    if float(np.asarray(finite).reshape(-1)[0]) == 1.0:
      self.consecutive = 0
      return
    self.total += 1
    self.consecutive += 1
    ids = np.asarray(ids).reshape(-1).tolist()
    logging.warning("Step %d skipped (not applied): non-finite loss or "
                    "gradients; batch record ids %s; %d in a row, %d in all.",
                    step, ids, self.consecutive, self.total)
    if self.consecutive >= self.max_consecutive:
      raise FloatingPointError(
          f"{self.consecutive} consecutive steps up to step {step} had a "
          f"non-finite loss or gradients (config.max_bad_steps="
          f"{self.max_consecutive}); last batch's record ids: {ids}. The "
          "last checkpoint holds the last good state.")
