"""Ahead-of-time TPU compile of the real train step (slow; needs [tpu]).

Run with `make test-slow` (installs the [tpu] extra: libtpu for this jax).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _aot(tmp_path, *flags, config="configs/scale.py:pair=tiny,batch=8"):
  pytest.importorskip("libtpu", reason="the [tpu] extra (libtpu) is needed "
                      "to compile for TPU; `make test-slow` installs it")
  out = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  res = subprocess.run(
      [sys.executable, "-m", "evl_ecg_jax.aot", f"--config={config}",
       "--topology=v5e:2x2", f"--json={out}", *flags], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=900)
  return res, json.loads(out.read_text()) if out.exists() else None


def test_tiny_config_compiles_for_v5e_2x2(tmp_path):
  res, report = _aot(tmp_path)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert report["fits"] and report["chips"] == 4
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert 0 < report["peak_gib"] < report["hbm_per_chip_gib"] == 16.0
  assert report["arguments_gib"] > 0 and report["aliased_gib"] > 0  # donated
  # Model FLOPs (loop-free lowerings) agree with XLA's count of the
  # compiled step once the Sinkhorn loop, which XLA counts once, is set
  # aside (no remat at this size).
  model = report["model_flops_per_step"] - report["sinkhorn_flops_bound"]
  assert report["xla_flops_per_step"] == pytest.approx(model, rel=0.1)
  assert report["step_s_at_40pct"] == pytest.approx(
      report["step_s_at_100pct"] / 0.4)
  assert "fits" in res.stdout and "GiB" in res.stdout
  assert report["xla_optimization_level"] == "default"
  # The config's optimization level reaches libtpu: at O0 the same step
  # compiles to another program (its temporaries differ).
  res, fast = _aot(tmp_path, "--config.xla_optimization_level=O0")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert fast["xla_optimization_level"] == "O0"
  assert "(XLA optimization level O0)" in res.stdout
  assert fast["temporaries_gib"] != report["temporaries_gib"]


def test_a_step_that_does_not_fit_fails_clearly(tmp_path):
  res, report = _aot(tmp_path, "--hbm_gib=0.0001")
  assert res.returncode == 1
  assert not report["fits"]
  assert "DOES NOT FIT" in res.stdout


def test_task_only_step_compiles_without_a_teacher(tmp_path):
  res, report = _aot(tmp_path, config="configs/scale.py:pair=tiny,batch=8,"
                     "loss=ce")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert report["fits"] and report["teacher_params"] == 0
  assert report["model_flops_per_step"] == (
      8 * 3 * report["student_fwd_flops_per_example"])
  assert "no teacher (task loss only)" in res.stdout


def test_max_batch_search_brackets_the_budget(tmp_path):
  # Scanned stacks; a budget that the tiny pair exceeds between 8 and 512.
  res, report = _aot(tmp_path, "--max_batch", "--hbm_gib=0.02",
                     "--max_batch_limit=512", "--config.teacher.scan=true",
                     "--config.student.scan=true")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert report["scan"] == {"teacher": True, "student": True}
  probes = {p["batch_size"]: p for p in report["probes"]}
  best, miss = report["max_batch"], report["first_miss"]
  assert best >= 8 and miss is not None and best < miss
  assert probes[best]["fits"] and probes[best]["peak_gib"] <= 0.02
  assert not probes[miss]["fits"]
  assert miss - best <= max(4, best // 8)  # bisected, not just doubled
  assert f"largest global batch that fits on v5e:2x2: {best}" in res.stdout


def test_vlm_distill_step_compiles(tmp_path):
  res, report = _aot(
      tmp_path, "--batch_size=8", "--config.teacher.overrides.scan=true",
      config="configs/vlm.py:size=tiny,mode=distill,parallel=spmd")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  assert report["fits"] and report["scan"] == {"teacher": True,
                                               "student": False}
  assert report["model_flops_per_step"] > 0
