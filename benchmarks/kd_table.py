r"""KD-method comparison on real ECGs: protocols x methods x seeds.

  python benchmarks/kd_table.py --manual_dir=../shared/data/ptbxl \
      --folds=shared --out=workdir/kd_table

Superdiagnostic PTB-XL labels (5 classes), 100 Hz; folds from --folds
(`shared`: train 1-7 / val 8 / test 9 for the shared subset; `standard`:
1-8 / 9 / 10 for a full PTB-XL copy). Protocols:
  full        teacher and student see 12 leads and every training label;
  leads_I     the student reads lead I only (a wearable), the teacher 12;
  leads_I+II  the student reads leads I and II;
  labels      the student keeps labels for 10 % of the training records
              (stratified, seeded per seed); distillation uses all records.
Steps:
  1. teacher: each --teachers candidate is trained once (12 leads, all
     labels); the best by validation macro-AUC is the teacher of every
     protocol (recorded).
  2. tuning: each method's λ is chosen from --grid on the validation split
     of --tune_protocol, seed 0 (recorded).
  3. table: every protocol x method x seed, test metrics with F1
     thresholds chosen on validation.
Every run lives in its own workdir under --out and is reused when its
metrics.json exists, so an interrupted table resumes where it stopped.
Writes kd_table.json (every run, the choices, the statistics, and what
the figures need) and kd_table.md under --out, then publishes the JSON to
docs/results/kd_table.json and docs/results.md (`benchmarks/kd_report.py`
regenerates the document from that JSON alone).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import config as config_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.eval import stats  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import loop  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/kd_table", "Output directory.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", os.environ.get("PTBXL_DIR", ""),
    "PTB-XL in its official layout (ptbxl_database.csv, records100/).")
_FOLDS = flags.DEFINE_enum("folds", "shared", ["shared", "standard"],
                           "PTB-XL fold assignment (configs/default.py).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per cell.")
_PROTOCOLS = flags.DEFINE_list(
    "protocols", ["full", "leads_I", "leads_I+II", "labels"], "Protocols.")
_METHODS = flags.DEFINE_list(
    "methods", ["ce", "kd", "fitnet", "rkd", "dkd", "tinybert", "uld", "evl",
                "evl_no_mhca", "evl_no_ot", "evl_no_rel"],
    "Rows (config loss variants).")
_TEACHERS = flags.DEFINE_list(
    "teachers", ["vit1d:tiny", "cnn1d:small"],
    "Teacher candidates family:size, chosen on validation.")
_STUDENT = flags.DEFINE_string("student", "cnn1d:tiny", "Student family:size.")
_GRID = flags.DEFINE_list("grid", ["0.01", "0.1", "1"],
                          "λ candidates per method (EVL: λ_m = λ_r = λ_ot).")
_TUNE_PROTOCOL = flags.DEFINE_string(
    "tune_protocol", "leads_I",
    "Protocol whose validation split picks λ (a regime where the teacher "
    "knows more than the student sees).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 600, "Teacher steps.")
_STUDENT_STEPS = flags.DEFINE_integer("student_steps", 300, "Student steps.")
# --docs (kd_report's flag): the published report; its JSON goes to
# results/kd_table.json beside it ('' to skip publishing).

PROTOCOLS = {  # name -> (config variants, config overrides)
    "full": ("", {}),
    "leads_I": ("student_leads=I", {}),
    "leads_I+II": ("student_leads=I+II", {}),
    "labels": ("", {"data.label_fraction": 0.1}),
}
# The λ fields each method's grid value sets (others keep the config's).
_TUNED = {
    "kd": ("kd_weight",), "fitnet": ("fitnet_weight",),
    "rkd": ("rkd_weight",), "dkd": ("dkd_weight",),
    "tinybert": ("tinybert_weight",), "uld": ("uld_weight",),
    "evl": ("mhca_weight", "relation_weight", "ot_weight"),
}


def _family(method):
  """EVL ablations share EVL's λ."""
  return "evl" if method.startswith("evl") else method


def _config(arg, seed, overrides):
  config = default.get_config(f"data=ptbxl,folds={_FOLDS.value},{arg}")
  config.data.manual_dir = _MANUAL_DIR.value
  config.data.data_dir = os.path.join(_OUT.value, "tfds")
  config.seed = seed
  config.data.shuffle_seed = seed
  config.data.label_seed = seed
  return config_lib.override(config, overrides)


def _set_steps(config, steps):
  """Run length; the warmup stays within its first tenth."""
  config.total_steps = steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)


def _run(name, config):
  """Runs (or reuses) one workdir; returns its metrics.json."""
  workdir = os.path.join(_OUT.value, "runs", name)
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    logging.info("Run %s", name)
    loop.fit(config, workdir)
    # Hundreds of runs in one process: drop the compiled executables of
    # finished runs (XLA:CPU segfaulted once, compiling, after ~100 runs
    # without this; the table resumes from the finished runs either way).
    jax.clear_caches()
  with open(path, encoding="utf-8") as f:
    return dict(json.load(f), workdir=workdir)


def _teacher():
  """Trains every candidate; returns (workdir, its family:size, all)."""
  candidates = {}
  for spec in _TEACHERS.value:
    family, size = spec.split(":")
    config = _config(f"mode=train_teacher,teacher={family},"
                     f"teacher_size={size}", 0, {})
    _set_steps(config, _TEACHER_STEPS.value)
    candidates[spec] = _run(f"teacher_{family}_{size}", config)
  best = max(candidates,
             key=lambda k: candidates[k]["validation/macro_auc"])
  return best, candidates


def _student_config(method, protocol, seed, teacher_spec, teacher_dir,
                    weights):
  family, size = _STUDENT.value.split(":")
  t_family, t_size = teacher_spec.split(":")
  variants, overrides = PROTOCOLS[protocol]
  arg = (f"mode=distill,loss={method},teacher={t_family},"
         f"teacher_size={t_size},model={family},student_size={size}"
         + (f",{variants}" if variants else ""))
  loss = {f"loss.{k}": v for k, v in weights.items()}
  if method.startswith("evl_no_"):  # the ablated term stays off
    off = {"evl_no_mhca": "mhca", "evl_no_ot": "ot",
           "evl_no_rel": "relation"}[method]
    loss[f"loss.{off}_weight"] = 0.0
  # The teacher is frozen and no augmentation is on: read its outputs from
  # the cache (train/teacher_cache.py) instead of running it every step.
  config = _config(arg, seed, {**overrides, **loss,
                               "teacher.init": teacher_dir,
                               "teacher.cache_features": method != "ce"})
  _set_steps(config, _STUDENT_STEPS.value)
  return config


def _tune(teacher_spec, teacher_dir):
  """{method family: {λ field: value}} chosen on validation, and the runs."""
  chosen, runs = {}, {}
  for method in dict.fromkeys(_family(m) for m in _METHODS.value):
    if method == "ce":
      continue
    scores = {}
    for value in _GRID.value:
      weights = {field: float(value) for field in _TUNED[method]}
      name = f"tune_{_TUNE_PROTOCOL.value}_{method}_{value}"
      metrics = _run(name, _student_config(
          method, _TUNE_PROTOCOL.value, 0, teacher_spec, teacher_dir,
          weights))
      scores[value] = metrics["validation/macro_auc"]
    best = max(scores, key=scores.get)
    chosen[method] = {field: float(best) for field in _TUNED[method]}
    runs[method] = scores
  return chosen, runs


def main(argv):
  del argv
  if not _MANUAL_DIR.value:
    raise app.UsageError("--manual_dir (or $PTBXL_DIR) must point at PTB-XL.")
  teacher_spec, teachers = _teacher()
  teacher = teachers[teacher_spec]
  chosen, tuning = _tune(teacher_spec, teacher["workdir"])
  runs = []
  for protocol in _PROTOCOLS.value:
    for method in _METHODS.value:
      weights = chosen.get(_family(method), {})
      tag = "_".join(f"{v:g}" for v in sorted(set(weights.values())))
      for seed in range(_SEEDS.value):
        # The λ is part of the name: a rerun with other choices never reuses
        # a run made with different weights.
        name = f"{protocol}_{method}{'_' + tag if tag else ''}_seed{seed}"
        metrics = _run(name, _student_config(
            method, protocol, seed, teacher_spec, teacher["workdir"],
            weights))
        runs.append(dict(protocol=protocol, method=method, seed=seed,
                         metrics=metrics))
  result = dict(
      folds=_FOLDS.value, manual_dir=_MANUAL_DIR.value,
      student=_STUDENT.value, teacher=teacher_spec,
      teacher_candidates={k: {m: v[m] for m in ("validation/macro_auc",
                                                 "test/macro_auc")}
                          for k, v in teachers.items()},
      teacher_metrics=teacher, tuning=dict(protocol=_TUNE_PROTOCOL.value,
                                           grid=_GRID.value, scores=tuning,
                                           chosen=chosen),
      steps=dict(teacher=_TEACHER_STEPS.value, student=_STUDENT_STEPS.value),
      runs=runs, summary=stats.summarise(runs, teacher))
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "kd_table.json"), "w",
            encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=float)
  kd_report.collect(result)
  table = stats.markdown(result["summary"])
  with open(os.path.join(_OUT.value, "kd_table.md"), "w",
            encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  docs = kd_report._DOCS.value  # pylint: disable=protected-access
  if docs:
    kd_report.publish(result, docs, os.path.join(
        os.path.dirname(docs), "results", "kd_table.json"))


if __name__ == "__main__":
  app.run(main)
