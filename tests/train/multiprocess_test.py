"""Multi-host: 2 processes x 4 fake CPU devices == 1 process x 8 devices.

`python -m evl_ecg_jax.main --jax_distributed` with an explicit coordinator
on localhost (CPU collectives across processes go through gloo). The data
pipeline gives every process its rows of the same global batches, so the
two-process run must reproduce the one-process run: same losses, same
parameters in the checkpoint, same metrics; only process 0 writes logs.
Both for a teacher trained on the task loss and for the shipped `loss=evl`
distilled from it, whose batch relations compare the records of the
global batch across the two processes (docs/scale.md).
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


def _main(workdir, tfds_dir, parallel, devices, extra=(),
          mode="mode=train_teacher"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices}"))
  cmd = [sys.executable, "-m", "evl_ecg_jax.main",
         f"--config=configs/default.py:{mode},runlocal,parallel={parallel}",
         f"--config.data.data_dir={tfds_dir}", f"--workdir={workdir}",
         *extra]
  # Output to a file: the processes run at once and are waited on in turn,
  # so an unread pipe that filled would stall a process (and, through the
  # collectives, its peer).
  ids = [a.split("=")[-1] for a in extra if a.startswith("--process_id=")]
  log = f"{workdir}.{ids[0] if ids else 'single'}.log"
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


def _losses(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r[key]) for r in rows if key in r]


def _two_processes(workdir, tfds_dir, parallel, extra=(), **kw):
  port = _free_port()
  return [_main(workdir, tfds_dir, parallel, 4, [
      *extra, "--jax_distributed", f"--coordinator_address=localhost:{port}",
      "--num_processes=2", f"--process_id={i}"], **kw) for i in range(2)]


@pytest.fixture(scope="module")
def pmap_teacher(tfds_dir, tmp_path_factory):
  """The workdir of a one-process pmap teacher run on 8 devices."""
  workdir = str(tmp_path_factory.mktemp("pmap") / "one")
  _wait([_main(workdir, tfds_dir, "pmap", 8)])
  return workdir


@pytest.mark.parametrize("parallel", [
    "pmap", pytest.param("spmd", marks=pytest.mark.slow)])
def test_two_processes_reproduce_one(parallel, tfds_dir, tmp_path, request):
  two = str(tmp_path / "two")
  if parallel == "pmap":
    one = request.getfixturevalue("pmap_teacher")
    _wait(_two_processes(two, tfds_dir, parallel))
  else:
    one = str(tmp_path / "one")
    _wait([_main(one, tfds_dir, parallel, 8)] + _two_processes(
        two, tfds_dir, parallel))

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


def test_two_processes_distill_evl_as_one(pmap_teacher, tfds_dir, tmp_path):
  # The shipped EVL at 1 record per device in one process (8 devices) and
  # 2 per device in each of two (4 devices each): one global batch of 8.
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  distill = dict(mode="mode=distill,loss=evl")
  # Diagnostics off: their programs compile in every process (the terms'
  # parity is what is tested).
  init = [f"--config.teacher.init={pmap_teacher}",
          "--config.eval.diagnostics=False"]
  _wait([_main(one, tfds_dir, "pmap", 8, init, **distill)]
        + _two_processes(two, tfds_dir, "pmap", init, **distill))
  for key in ("train/loss", "train/relation", "train/kd", "train/ot"):
    steps_one, values_one = zip(*_losses(one, key))
    steps_two, values_two = zip(*_losses(two, key))
    assert steps_two == steps_one == (2, 4), key
    np.testing.assert_allclose(values_two, values_one, rtol=1e-4, err_msg=key)
  assert min(v for _, v in _losses(one, "train/relation")) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4,
                                                       atol=2e-5),
               checkpoint.load_params(one), checkpoint.load_params(two))
