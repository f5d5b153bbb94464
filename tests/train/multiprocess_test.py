"""Multi-host: 2 processes x 4 fake CPU devices == 1 process x 8 devices.

`python -m evl_ecg_jax.main --jax_distributed` with an explicit coordinator
on localhost (CPU collectives across processes go through gloo). The data
pipeline gives every process its rows of the same global batches, so the
two-process run must reproduce the one-process run: same losses, same
parameters in the checkpoint, same metrics; only process 0 writes logs.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from evl_ecg_jax import checkpoint


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _main(workdir, tfds_dir, parallel, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices}"))
  cmd = [sys.executable, "-m", "evl_ecg_jax.main",
         "--config=configs/default.py:mode=train_teacher,runlocal,"
         f"parallel={parallel}",
         f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}",
         *extra]
  # Output to a file: the processes run at once and are waited on in turn,
  # so an unread pipe that filled would stall a process (and, through the
  # collectives, its peer).
  log = f"{workdir}.{extra[-1].split('=')[-1] if extra else 'single'}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, text=True)
  proc.log_path = log
  return proc


def _wait(procs, timeout=600):
  for p in procs:
    p.wait(timeout=timeout)
  outs = []
  for p in procs:
    with open(p.log_path) as f:
      outs.append(f.read())
    assert p.returncode == 0, outs[-1][-3000:]
  return outs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.mark.parametrize("parallel", [
    "pmap", pytest.param("spmd", marks=pytest.mark.slow)])
def test_two_processes_reproduce_one(parallel, tfds_dir, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = _free_port()
  procs = [_main(one, tfds_dir, parallel, 8)] + [
      _main(two, tfds_dir, parallel, 4, [
          "--jax_distributed", f"--coordinator_address=localhost:{port}",
          "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
  _wait(procs)

  losses_one, losses_two = _losses(one), _losses(two)
  assert [s for s, _ in losses_two] == [2, 4]  # one writer, no duplicates
  np.testing.assert_allclose([l for _, l in losses_two],
                             [l for _, l in losses_one], rtol=1e-5)
  params_one = checkpoint.load_params(one)
  params_two = checkpoint.load_params(two)
  # gloo sums across processes in another order than one process does;
  # Adam's normalised step turns that into ~1e-6 on near-zero params.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4,
                                                       atol=2e-5),
               params_one, params_two)
  with open(os.path.join(one, "metrics.json")) as f:
    metrics_one = json.load(f)
  with open(os.path.join(two, "metrics.json")) as f:
    metrics_two = json.load(f)
  assert metrics_two["parallel"] == parallel
  for key in ("validation/macro_auc", "test/macro_auc"):
    np.testing.assert_allclose(metrics_two[key], metrics_one[key], atol=1e-5)
  assert metrics_two["test/n"] == metrics_one["test/n"] == 64
