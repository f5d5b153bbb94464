r"""Config sweeps: one run per point, each in its own workdir, then a table.

  python -m evl_ecg_jax.sweep --config=configs/default.py:mode=distill \
      --sweep=configs/sweeps/loss_methods.py --workdir=workdir/sweep \
      -- --config.teacher.init=workdir/teacher

A sweep file defines `get_sweep(arg=None)` returning a list of points; a
point is a dict of overrides: "variants" (appended to the --config
variants, e.g. "loss=evl,student_leads=I") and dotted config fields
("loss.terms.ot.weight": 0.1 -> --config.loss.terms.ot.weight=0.1). Arguments
after `--` go to every run.

--launch=local (default) runs the points one after the other in
subprocesses (a point whose metrics.json exists is skipped, so an
interrupted sweep resumes) and writes <workdir>/sweep.json and sweep.md
with each point's metrics. --launch=tpu emits, per point, the create /
setup / run commands of launch/tpu.py on its own slice <tpu_name>-<i>
(--dry_run prints them; the table is then built by a later local call
with --collect_only once the runs have written their metrics).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath

from evl_ecg_jax import tpu

_CONFIG = flags.DEFINE_string("config", "configs/default.py",
                              "Base --config (file[:variants]).")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (get_sweep) [:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root; one subdir per point.")
_LAUNCH = flags.DEFINE_enum("launch", "local", ["local", "tpu"],
                            "Run locally in sequence or emit TPU launches.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print commands, run none.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False,
                                  "Only build the table from the workdirs.")
_TPU_NAME = flags.DEFINE_string("tpu_name", "evl-sweep", "Slice name prefix.")
_ZONE = flags.DEFINE_string("zone", "", "GCP zone (--launch=tpu).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology.")
COLUMNS = ("validation/macro_auc", "test/macro_auc", "test/macro_f1",
           "num_params")
_COLUMNS = flags.DEFINE_list(
    "columns", list(COLUMNS), "metrics.json keys in the table (e.g. "
    "validation/soft/macro_auc,test/soft/macro_auc for configs/vlm.py).")


def load_sweep(spec: str) -> list[dict]:
  """Points of `file.py[:arg]` (ValueError naming the file and the point)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("sweep_file", path)
  if module_spec is None or not os.path.isfile(path):
    raise ValueError(f"--sweep={spec!r}: no sweep file at {path}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path}: expected a get_sweep(arg=None) function.")
  points = list(module.get_sweep(arg or None))
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not point:
      raise ValueError(f"{path}: point {i} is {point!r}; expected a "
                       "non-empty dict of overrides.")
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: duplicate points {sorted(names)}.")
  return points


def point_name(point: dict) -> str:
  """A workdir-safe name: "loss=evl" + {"loss.terms.ot.weight": 0.1} ->
  "loss-evl_loss.terms.ot.weight-0.1"."""
  parts = [point["variants"]] if point.get("variants") else []
  parts += [f"{k}={v}" for k, v in sorted(point.items()) if k != "variants"]
  name = "_".join(p.replace(",", "_") for p in parts)
  return re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def point_config(config: str, point: dict) -> tuple[str, list[str]]:
  """(--config value with the point's variants, its field overrides)."""
  file, _, variants = config.partition(":")
  variants = ",".join(filter(None, [variants, point.get("variants", "")]))
  overrides = [f"--config.{k}={v}" for k, v in sorted(point.items())
               if k != "variants"]
  return (f"{file}:{variants}" if variants else file), overrides


def collect(root: str, points, columns=COLUMNS) -> list[dict]:
  """One row per point from its metrics.json (missing: status 'missing')."""
  rows = []
  for point in points:
    name = point_name(point)
    path = epath.Path(root) / name / "metrics.json"
    row = {"point": name, "overrides": point}
    if path.exists():
      metrics = json.loads(path.read_text())
      row.update(status="done", **{k: metrics.get(k) for k in columns})
    else:
      row["status"] = "missing"
    rows.append(row)
  return rows


def markdown(rows, columns=COLUMNS) -> str:
  fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float)
                                        else str(v))
  out = ["| point | status | " + " | ".join(columns) + " |",
         "|---" * (len(columns) + 2) + "|"]
  for row in rows:
    out.append(f"| {row['point']} | {row['status']} | " + " | ".join(
        fmt(row.get(k)) for k in columns) + " |")
  return "\n".join(out) + "\n"


def write_table(root: str, rows, columns=COLUMNS) -> None:
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  (epath.Path(root) / "sweep.json").write_text(json.dumps(rows, indent=2))
  (epath.Path(root) / "sweep.md").write_text(markdown(rows, columns))


def main(argv):
  extra = [a for a in argv[1:] if a != "--"]  # overrides for every run
  points = load_sweep(_SWEEP.value)
  root = _WORKDIR.value.rstrip("/")
  if not _COLLECT_ONLY.value:
    for i, point in enumerate(points):
      workdir = f"{root}/{point_name(point)}"
      config, overrides = point_config(_CONFIG.value, point)
      overrides += extra
      if _LAUNCH.value == "tpu":
        s = tpu.Slice(name=f"{_TPU_NAME.value}-{i}", zone=_ZONE.value,
                      topology=tpu.topology(_TOPOLOGY.value))
        commands = (tpu.create(s) + tpu.setup(s, f"/tmp/{s.name}.tar.gz")
                    + tpu.run(s, config, workdir, overrides))
      else:
        if (epath.Path(workdir) / "metrics.json").exists():
          logging.info("%s: done, skipped.", workdir)
          continue
        commands = [[sys.executable, "-m", "evl_ecg_jax.main",
                     f"--config={config}", f"--workdir={workdir}"]
                    + overrides]
      for command in commands:
        print(shlex.join(command), flush=True)
        if not _DRY_RUN.value:
          subprocess.run(command, check=True)
  if _LAUNCH.value == "local" and not _DRY_RUN.value:
    rows = collect(root, points, _COLUMNS.value)
    write_table(root, rows, _COLUMNS.value)
    print(markdown(rows, _COLUMNS.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep", "workdir"])
  app.run(main)
