"""A teacher written in PyTorch (benchmarks/torch_teacher.py: a CODE-like
ResNet reading 400 Hz, 4096 samples, leads first), exported with
torch.onnx, distils a cnn1d student on the shared PTB-XL subset through its
spec's resampling, padding and layout: KD from its store beats task-only
on validation in the labels protocol (10 % of the training records keep
their labels). Runs the commands of docs/teachers.md as a user would.

Slow (about 5 min on 2 cores) and needs the torch-reference extra (`make
test-slow` installs it) and ../shared/data/ptbxl.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import DATA
from conftest import REPO

pytestmark = pytest.mark.slow
PTBXL = os.path.join(DATA, "ptbxl")
CONFIG = "configs/default.py:data=ptbxl,folds=shared,mode=distill"


def _run(args, cwd=REPO):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=1500,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.skipif(not os.path.isdir(PTBXL), reason=f"needs {PTBXL}")
def test_a_pytorch_teacher_distils_a_cnn1d_student(tmp_path):
  pytest.importorskip("torch", reason="needs the torch-reference extra")
  data = [f"--config.data.manual_dir={PTBXL}",
          f"--config.data.data_dir={tmp_path / 'tfds'}"]
  out = tmp_path / "torch_teacher"
  _run(["benchmarks/torch_teacher.py", f"--out={out}", *data])
  summary = json.loads((out / "teacher.json").read_text())
  assert summary["validation_macro_auc"] > 0.85, summary
  teacher = [f"--config.teacher.onnx={out / 'teacher.onnx'}",
             f"--config.teacher.onnx_spec={out / 'teacher_spec.json'}",
             "--config.data.label_fraction=0.1"]
  store = json.loads(_run(["-m", "evl_ecg_jax.teachers",
                           f"--config={CONFIG},loss=kd", *teacher, *data]))
  assert store["outputs"]["teacher/logits"][1:] == [5]
  assert store["outputs"]["teacher/pooled"][1:] == [128]
  results = {}
  for loss in ("ce", "kd"):
    workdir = tmp_path / f"student_{loss}"
    _run(["-m", "evl_ecg_jax.main", f"--config={CONFIG},loss={loss}",
          f"--workdir={workdir}", *data,
          *(teacher if loss == "kd" else teacher[2:])])
    results[loss] = json.loads((workdir / "metrics.json").read_text())
  # One seed each (2026-12-08, 2 cores: 0.8953 against 0.8780; the
  # teacher 0.9255): the validation fold's seed noise is about 0.017.
  assert (results["kd"]["validation/macro_auc"]
          > results["ce"]["validation/macro_auc"]), results
