"""SIGTERM (a preemption notice) saves at the next step and exits 0; the
same command resumes and ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import REPO
from evl_ecg_jax import checkpoint

STEPS = 60


def _start(workdir, tfds_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen(
      [sys.executable, "-m", "evl_ecg_jax.main",
       "--config=configs/default.py:mode=train_teacher,runlocal",
       f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}",
       f"--config.total_steps={STEPS}", f"--config.ckpt_every_steps={STEPS}",
       f"--config.eval_every_steps={STEPS}", "--config.log_every_steps=1"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _finish(proc):
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  return out


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def test_sigterm_saves_exits_zero_and_resumes_exactly(tfds_dir, tmp_path):
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  _finish(_start(whole, tfds_dir))

  proc = _start(cut, tfds_dir)
  deadline = time.time() + 300
  while len(_logged_steps(cut)) < 5 and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  saved = checkpoint.latest_step(cut)
  assert saved is not None and 5 <= saved < STEPS, out[-2000:]
  assert "Preemption notice" in out
  assert not os.path.exists(os.path.join(cut, "metrics.json"))  # unfinished

  _finish(_start(cut, tfds_dir))  # the same command resumes
  assert checkpoint.latest_step(cut) == STEPS
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(cut),
               checkpoint.load_params(whole))
  steps = _logged_steps(cut)
  assert steps[-1] == STEPS and set(range(1, STEPS + 1)) <= set(steps)
