"""The quiet console: benign library warnings are demoted to INFO (to the
log file, not the terminal); other warnings keep their level."""

import logging as std_logging

from absl import logging

from evl_ecg_jax import console


class _Records(std_logging.Handler):

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append((record.levelno, record.getMessage()))


def test_benign_orbax_warnings_become_info_and_others_stay():
  console.demote_benign_warnings()
  console.demote_benign_warnings()  # idempotent
  absl_logger = std_logging.getLogger("absl")
  assert sum(isinstance(f, console._Demote)  # pylint: disable=protected-access
             for f in absl_logger.filters) == 1
  records = _Records()
  absl_logger.addHandler(records)
  try:
    logging.warning("Given directory is read only=%s", "/x/checkpoints")
    logging.warning("Preemption notice (SIGTERM): saved step %d", 3)
  finally:
    absl_logger.removeHandler(records)
  assert records.records == [
      (std_logging.INFO, "Given directory is read only=/x/checkpoints"),
      (std_logging.WARNING, "Preemption notice (SIGTERM): saved step 3")]


def test_metrics_line_shows_the_named_scalars_present():
  line = console.metrics_line("step 5", {"a": 0.87123, "b": "x", "c": 1.0},
                              ["a", "b", "missing", "c"])
  assert line == "step 5: a 0.8712 · c 1.0000"
