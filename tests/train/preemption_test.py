"""Preemption and crashes: SIGTERM (a preemption notice) saves at the next
step and exits 0; SIGKILL at a random step loses only the steps after the
last checkpoint. Either way the same command resumes and ends with params
bit-identical to an uninterrupted run (CPU, one device). Both interrupt one
workdir in turn: 4 processes instead of 5 (the suite's time)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO
from evl_ecg_jax import checkpoint

STEPS = 40


def _start(workdir, tfds_dir, ckpt_every=STEPS, extra=()):
  """The run in its own process; its output goes to <workdir>.log (a pipe
  nobody reads while the test polls would fill and stall the run)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  with open(workdir + ".log", "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "evl_ecg_jax.main",
         "--config=configs/default.py:mode=train_teacher,runlocal",
         f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}",
         f"--config.total_steps={STEPS}",
         f"--config.ckpt_every_steps={ckpt_every}",
         f"--config.eval_every_steps={STEPS}", "--config.log_every_steps=1",
         *extra],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log.name
  return proc


def _output(proc):
  with open(proc.log_path) as f:
    return f.read()


def _finish(proc):
  proc.wait(timeout=600)
  out = _output(proc)
  assert proc.returncode == 0, out[-3000:]
  return out


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def whole(tfds_dir, tmp_path_factory):
  """An uninterrupted run's workdir."""
  workdir = str(tmp_path_factory.mktemp("whole"))
  _finish(_start(workdir, tfds_dir))
  return workdir


def _wait_until(proc, done):
  """Polls `done()` while the run is alive (at most 5 min)."""
  deadline = time.time() + 300
  while not done() and time.time() < deadline:
    assert proc.poll() is None, _output(proc)[-3000:]
    time.sleep(0.05)


def _wait_for_step(proc, workdir, step):
  _wait_until(proc, lambda: len(_logged_steps(workdir)) >= step)


def _wait_for_a_save_after(proc, workdir, step):
  """The saves are async: on a slow machine one may still be in flight
  when the run is already steps further. Waits until one after `step` has
  finished, so that a kill after it leaves a checkpoint to resume from (a
  later save may still be cut mid-way)."""
  _wait_until(proc, lambda: (checkpoint.latest_step(workdir) or 0) > step)


def test_sigterm_then_sigkill_both_resume_exactly(whole, tfds_dir, tmp_path):
  """One workdir, interrupted twice (four processes in all): a SIGTERM
  before the first periodic save, then, in the resumed run (checkpoints
  every 7 steps), a SIGKILL at a random step after its first save, possibly
  in the middle of a later one. Each rerun restores the last finished
  checkpoint (never a partial one) and replays the lost steps with the same
  data and RNG; the params end bit-identical to the uninterrupted run."""
  cut = str(tmp_path / "cut")
  proc = _start(cut, tfds_dir, ckpt_every=7)
  _wait_for_step(proc, cut, 3)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  saved = checkpoint.latest_step(cut)
  assert saved is not None and 3 <= saved < STEPS, out[-2000:]
  assert "Preemption notice" in out  # a warning reaches the terminal
  assert not os.path.exists(os.path.join(cut, "metrics.json"))  # unfinished
  # Library INFO logs go to the workdir's log file, not the terminal.
  with open(os.path.join(cut, "log.txt")) as f:
    assert "CheckpointManager created" in f.read()
  assert "CheckpointManager created" not in out

  # The same command resumes (absl's flag brings the INFO logs back); it
  # is killed at a random step after its first save.
  kill_at = random.randrange(min(saved + 9, STEPS - 4), STEPS - 3)
  proc = _start(cut, tfds_dir, ckpt_every=7, extra=["--alsologtostderr"])
  _wait_for_step(proc, cut, kill_at)
  _wait_for_a_save_after(proc, cut, saved)
  proc.kill()
  proc.wait(timeout=60)
  out = _output(proc)
  assert proc.returncode == -signal.SIGKILL, f"killed at step {kill_at}"
  assert f"Resumed from step {saved}" in out
  assert "CheckpointManager created" in out
  killed = checkpoint.latest_step(cut)
  assert killed > saved and killed % 7 == 0, (kill_at, killed)
  assert killed <= max(_logged_steps(cut)), (kill_at, killed)

  out = _finish(_start(cut, tfds_dir, ckpt_every=7))
  assert f"step {STEPS}: validation/macro_auc" in out
  with open(os.path.join(cut, "log.txt")) as f:  # appended by each run
    assert f"Resumed from step {killed}" in f.read()
  assert checkpoint.latest_step(cut) == STEPS
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(
          a, b, err_msg=f"killed at step {kill_at}, resumed from {killed}"),
      checkpoint.load_params(cut), checkpoint.load_params(whole))
  steps = _logged_steps(cut)
  assert steps[-1] == STEPS and set(range(1, STEPS + 1)) <= set(steps)
