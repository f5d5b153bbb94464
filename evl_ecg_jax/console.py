"""What the terminal shows: progress, one line per validation, warnings and
errors, and results. Library INFO logs (orbax, tfds, absl, ours) go to a
log file in the workdir instead; absl's --alsologtostderr (or
--stderrthreshold=info) brings them back to the terminal.

  console.quiet(workdir)   # once, at the start of a program
  console.show("step 500: validation/macro_auc 0.871")
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import flags
from absl import logging
import jax
import tqdm

LOG_NAME = "log.txt"
# Warnings that libraries emit on every normal run; they go to the log file
# as INFO. Orbax warns each time a checkpoint is opened read-only, which is
# how every distillation run loads its teacher.
BENIGN_WARNINGS = (
    "Given directory is read only",
    "CheckpointManagerOptions.read_only=True, setting save_interval_steps",
)


class _Demote(std_logging.Filter):
  """Turns the BENIGN_WARNINGS into INFO records."""

  def filter(self, record):
    if record.levelno == std_logging.WARNING and any(
        record.getMessage().startswith(m) for m in BENIGN_WARNINGS):
      record.levelno, record.levelname = std_logging.INFO, "INFO"
    return True


def demote_benign_warnings() -> None:
  """Installs the filter on absl's logger (idempotent; also in processes
  whose flags are not parsed, e.g. benchmark workers)."""
  logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _Demote) for f in logger.filters):
    logger.addFilter(_Demote())


class _LazyFile:
  """A log file created on its first write: a run that stops before
  logging anything (e.g. a config error) leaves no workdir behind."""

  def __init__(self, path: str):
    self.name, self._file = path, None

  def write(self, text: str) -> None:
    if self._file is None:
      os.makedirs(os.path.dirname(self.name) or ".", exist_ok=True)
      self._file = open(self.name, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._file.write(text)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def quiet(workdir: str) -> None:
  """Sends absl / Python logging to <workdir>/log.txt (appended) and keeps
  records at or above --stderrthreshold (WARNING unless given on the
  command line) on stderr. Changes nothing with --logtostderr or when
  flags are not parsed (under tests)."""
  demote_benign_warnings()
  if not flags.FLAGS.is_parsed() or flags.FLAGS.logtostderr:
    return
  path = os.path.join(workdir, LOG_NAME)
  handler = logging.get_absl_handler().python_handler
  if getattr(handler.stream, "name", None) == path:
    return
  if flags.FLAGS["stderrthreshold"].using_default_value:
    flags.FLAGS.stderrthreshold = "warning"
  handler.stream = _LazyFile(path)
  # Libraries that log through the standard logging module without absl's
  # handler (absl's is on the root logger once app.run has started).
  root = std_logging.getLogger()
  if logging.get_absl_handler() not in root.handlers:
    root.addHandler(logging.get_absl_handler())


def show(message: str) -> None:
  """One line on the terminal (above any progress bar; process 0 only on
  multi-host runs) and in every process's log."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stdout)
  logging.info("%s", message)


def metrics_line(prefix: str, metrics: dict, keys) -> str:
  """"prefix: k1 0.8712 · k2 0.5000" for the scalar `keys` present."""
  parts = [f"{k} {metrics[k]:.4f}" for k in keys
           if isinstance(metrics.get(k), (int, float))]
  return f"{prefix}: " + " · ".join(parts)
