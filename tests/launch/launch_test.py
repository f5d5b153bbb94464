"""launch/tpu.py --dry_run prints the gcloud commands; sweeps expand points."""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from evl_ecg_jax import sweep
from evl_ecg_jax import tpu


def _dry_run(*args):
  out = subprocess.run(
      [sys.executable, "launch/tpu.py", "--dry_run", *args], cwd=REPO,
      capture_output=True, text=True, check=True, timeout=120).stdout
  return [shlex.split(line) for line in out.splitlines()]


def test_dry_run_prints_every_command_of_a_queued_launch():
  cmds = _dry_run("--name=evl", "--zone=us-east5-a", "--topology=v5e:4x4",
                  "--queued", "--spot", "--config=configs/default.py:size=2b",
                  "--workdir=gs://bucket/run", "all", "delete", "--",
                  "--config.total_steps=10")
  heads = [" ".join(c[:5]) for c in cmds]
  assert heads[0] == "gcloud compute tpus queued-resources create"
  create = cmds[0]
  assert {"--accelerator-type=v5litepod-16", "--spot", "--node-id=evl",
          "--zone=us-east5-a",
          "--runtime-version=v2-alpha-tpuv5-lite"} <= set(create)
  assert "ACTIVE" in cmds[1][-1]  # waits for the queued resource
  assert cmds[2][:2] == ["git", "archive"]
  scp, install, run, logs, delete = cmds[3:]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and "--worker=all" in install
  assert "pip install" in install[-1] and "[tpu]" in install[-1]
  remote = run[-1].removeprefix("--command=")
  assert "--worker=all" in run
  for part in ("python3 -m evl_ecg_jax.main",
               "--config=configs/default.py:size=2b",
               "--workdir=gs://bucket/run", "--jax_distributed",
               "--config.total_steps=10", "nohup"):
    assert part in remote
  assert "--worker=0" in logs and "tail" in logs[-1]
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources",
                        "delete", "evl"] and "--quiet" in delete


def test_direct_tpu_vm_create_and_delete():
  create, delete = _dry_run("--name=n", "--zone=z", "--topology=v5p:2x2x2",
                            "create", "delete")
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n"]
  assert "--accelerator-type=v5p-16" in create
  assert "--version=v2-alpha-tpuv5" in create
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n"]


def test_bad_action_and_topology_are_named():
  res = subprocess.run([sys.executable, "launch/tpu.py", "--dry_run",
                        "--name=n", "--zone=z", "explode"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "explode" in res.stderr
  for bad, match in (("v5e-16", "generation"), ("v5e:2x2x2", "2 dims"),
                     ("v9:2x2", "generation")):
    with pytest.raises(ValueError, match=match):
      tpu.topology(bad)
  assert tpu.topology("v4:2x2x2").accelerator_type == "v4-16"
  assert tpu.topology("v5e:2x2").num_chips == 4


def test_sweep_points_names_and_run_arguments(tmp_path):
  points = sweep.load_sweep("configs/sweeps/evl_weights.py:2")
  assert len(points) == 6
  names = [sweep.point_name(p) for p in points]
  assert len(set(names)) == 6 and all("/" not in n for n in names)
  config, overrides = sweep.point_config(
      "configs/default.py:mode=distill", {"variants": "loss=evl",
                                          "loss.terms.ot.weight": 0.1})
  assert config == "configs/default.py:mode=distill,loss=evl"
  assert overrides == ["--config.loss.terms.ot.weight=0.1"]
  methods = sweep.load_sweep("configs/sweeps/loss_methods.py:student_leads=I")
  assert methods[0] == {"variants": "loss=ce,student_leads=I"}
  vlm = sweep.load_sweep("configs/sweeps/vlm_losses.py")
  control = sweep.load_sweep("configs/sweeps/vlm_losses.py:0.1")
  assert control[:-1] == vlm and len(vlm) == 4
  assert control[-1] == {"variants": "loss=evl_shuffled",
                         "loss.terms.mhca.weight": 0.01,
                         "loss.terms.relation.weight": 0.1,
                         "loss.terms.ot.weight": 0.1}
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep(arg=None):\n  return [{}]\n")
  with pytest.raises(ValueError, match="point 0"):
    sweep.load_sweep(str(bad))
  with pytest.raises(ValueError, match="no sweep file"):
    sweep.load_sweep(str(tmp_path / "missing.py"))


def test_sweep_tpu_dry_run_emits_one_launch_per_point(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "evl_ecg_jax.sweep", "--launch=tpu",
       "--dry_run", "--zone=z", "--sweep=configs/sweeps/loss_methods.py",
       "--config=configs/default.py:mode=distill",
       "--workdir=gs://bucket/sweep", "--", "--config.teacher.init=gs://t"],
      cwd=REPO, capture_output=True, text=True, check=True,
      timeout=120).stdout.splitlines()
  runs = [line for line in out if "evl_ecg_jax.main" in line]
  assert len(runs) == len(sweep.load_sweep("configs/sweeps/loss_methods.py"))
  assert "evl-sweep-9" in runs[9] and "loss=evl" in runs[9]
  assert all("--config.teacher.init=gs://t" in r for r in runs)
  assert "gs://bucket/sweep/loss-evl" in runs[9]


def test_sweep_runs_locally_resumes_and_tabulates(tfds_dir, tmp_path):
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(
      "def get_sweep(arg=None):\n"
      "  return [{'seed': 0}, {'seed': 1}]\n")
  root = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "evl_ecg_jax.sweep",
         "--config=configs/default.py:mode=train_teacher,runlocal",
         f"--sweep={sweep_file}", f"--workdir={root}", "--",
         f"--config.data.data_dir={tfds_dir}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600,
                 capture_output=True)
  rows = sweep.collect(str(root), sweep.load_sweep(str(sweep_file)))
  assert [r["status"] for r in rows] == ["done", "done"]
  assert all(0 <= r["test/macro_auc"] <= 1 for r in rows)
  assert rows[0]["test/macro_auc"] != rows[1]["test/macro_auc"]  # seeds
  assert (root / "sweep.md").read_text().count("| seed-") == 2
  # A second call skips finished points (prints no run command) and
  # tabulates the --columns asked for.
  again = subprocess.run(cmd[:4] + ["--columns=num_params"] + cmd[4:],
                         cwd=REPO, env=env, check=True, timeout=600,
                         capture_output=True, text=True)
  assert "evl_ecg_jax.main" not in again.stdout
  assert "| point | status | num_params |" in (root / "sweep.md").read_text()
