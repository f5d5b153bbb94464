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
Rows: the baselines, `evl_paper` (the paper's formulation), `evl` (ours,
docs/evl.md), its three ablations and `evl_shuffled` (EVL fed the teacher
outputs of another record of the batch: the control).
Steps (every choice on validation, mean over --tune_protocols, seed 0):
  1. teacher: each --teachers candidate is trained once (12 leads, all
     labels); the best by validation macro-AUC is the teacher of every
     protocol (recorded).
  2. length: task-only students for each of --steps_grid; the shortest
     within --flat_tol of the best is the student length (the curve is
     recorded: task-only must not be undertrained).
  3. tuning: each baseline's λ from --grid; EVL's λ per term, one term at
     a time from its _EVL_GRID row, the others at their current choice.
  4. table: every protocol x method x seed, test metrics with F1
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
    "protocols", ["leads_I", "labels", "full", "leads_I+II"],
    "Protocols (first the two where the teacher knows more than the "
    "student sees).")
_METHODS = flags.DEFINE_list(
    "methods", ["ce", "kd", "fitnet", "rkd", "dkd", "tinybert", "uld",
                "evl_paper", "evl", "evl_no_mhca", "evl_no_ot", "evl_no_rel",
                "evl_shuffled"],
    "Rows (config loss variants).")
_TEACHERS = flags.DEFINE_list(
    "teachers", ["vit1d:tiny", "cnn1d:small"],
    "Teacher candidates family:size, chosen on validation.")
_STUDENT = flags.DEFINE_string("student", "cnn1d:tiny", "Student family:size.")
_GRID = flags.DEFINE_list(
    "grid", ["0.01", "0.1", "1"],
    "λ candidates per baseline (and evl_paper's tied λ_m = λ_r = λ_ot).")
_TUNE_PROTOCOLS = flags.DEFINE_list(
    "tune_protocols", ["leads_I", "labels"],
    "Protocols whose mean validation macro-AUC (seed 0) picks the student "
    "length and every λ (regimes where the teacher knows more than the "
    "student sees).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 600, "Teacher steps.")
_STEPS_GRID = flags.DEFINE_list("steps_grid", ["300", "600", "1200"],
                                "Student lengths tried with task-only.")
_FLAT_TOL = flags.DEFINE_float(
    "flat_tol", 0.005, "The shortest length within this validation "
    "macro-AUC of the best is chosen (about one seed's std of it: a "
    "3-seed probe gave 0.8766 / 0.8774 / 0.8790 at 600 / 1000 / 1600 "
    "steps on leads_I, 0.8853 / 0.8886 / 0.8859 on labels).")
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
    "evl_paper": ("mhca_weight", "relation_weight", "ot_weight"),
}
# EVL's λ per term, tuned one at a time in this order from configs'
# defaults (λ_kd: the optional logit-KD term, 0 = off).
_EVL_GRID = (("relation_weight", (0.3, 1.0, 3.0)),
             ("ot_weight", (0.3, 1.0, 3.0)),
             ("mhca_weight", (0.01, 0.1, 1.0)),
             ("kd_weight", (0.0, 1.0)))


def _family(method):
  """EVL's ablations and control share EVL's λ."""
  return "evl" if method.startswith("evl") and method != "evl_paper" else (
      method)


def _config(arg, seed, overrides):
  config = default.get_config(f"data=ptbxl,folds={_FOLDS.value},{arg}")
  config.data.manual_dir = _MANUAL_DIR.value
  config.data.data_dir = os.path.join(_OUT.value, "tfds")
  config.data.in_memory = True  # hundreds of runs over one small split
  config.seed = seed
  config.data.shuffle_seed = seed
  config.data.label_seed = seed
  return config_lib.override(config, overrides)


def _set_steps(config, steps):
  """Run length; the warmup stays within its first tenth; validation (and
  diagnostics) four times a run, one checkpoint at the end."""
  config.total_steps = steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
  config.eval_every_steps = max(1, steps // 4)
  config.ckpt_every_steps = steps


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
                    weights, steps):
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
  # Diagnostics (their own compiles) only where the report draws them.
  config = _config(arg, seed, {**overrides, **loss,
                               "teacher.init": teacher_dir,
                               "teacher.cache_features": method != "ce",
                               "eval.diagnostics": method.startswith("evl")})
  _set_steps(config, steps)
  return config


def _name(prefix, method, weights, steps, seed):
  """The λ and the length are part of the name: a rerun with other choices
  never reuses a run made with different ones."""
  tag = "_".join(f"{k.split('_')[0]}{v:g}" for k, v in sorted(weights.items()))
  return f"{prefix}_{method}{'_' + tag if tag else ''}_s{steps}_seed{seed}"


def _validation(method, weights, steps, teacher_spec, teacher_dir):
  """Mean validation macro-AUC over the tuning protocols, seed 0."""
  scores = []
  for protocol in _TUNE_PROTOCOLS.value:
    metrics = _run(_name(f"tune_{protocol}", method, weights, steps, 0),
                   _student_config(method, protocol, 0, teacher_spec,
                                   teacher_dir, weights, steps))
    scores.append(metrics["validation/macro_auc"])
  return float(sum(scores) / len(scores))


def _length(teacher_spec, teacher_dir):
  """The student length: the shortest of --steps_grid whose task-only
  validation AUC is within --flat_tol of the best; and the curve."""
  curve = {int(n): _validation("ce", {}, int(n), teacher_spec, teacher_dir)
           for n in _STEPS_GRID.value}
  best = max(curve.values())
  steps = min(n for n, v in curve.items() if v >= best - _FLAT_TOL.value)
  return steps, curve


def _tune_evl(steps, teacher_spec, teacher_dir):
  """EVL's λ per term, one term at a time (_EVL_GRID); returns the choice
  and every (field, value, score) tried."""
  chosen = {f: default.get_config("loss=evl").loss[f] for f, _ in _EVL_GRID}
  tried = []
  for field, values in _EVL_GRID:
    scores = {}
    for value in values:
      weights = dict(chosen, **{field: float(value)})
      scores[value] = _validation("evl", weights, steps, teacher_spec,
                                  teacher_dir)
      tried.append(dict(field=field, value=float(value), weights=weights,
                        score=scores[value]))
    chosen[field] = float(max(scores, key=scores.get))
  return chosen, tried


def _tune(steps, teacher_spec, teacher_dir):
  """{method family: {λ field: value}} chosen on validation, and the runs."""
  chosen, runs = {}, {}
  for method in dict.fromkeys(_family(m) for m in _METHODS.value):
    if method == "ce":
      continue
    if method == "evl":
      chosen[method], runs[method] = _tune_evl(steps, teacher_spec,
                                               teacher_dir)
      continue
    scores = {}
    for value in _GRID.value:
      weights = {field: float(value) for field in _TUNED[method]}
      scores[value] = _validation(method, weights, steps, teacher_spec,
                                  teacher_dir)
    best = max(scores, key=scores.get)
    chosen[method] = {field: float(best) for field in _TUNED[method]}
    runs[method] = scores
  return chosen, runs


def _table(steps, chosen, teacher_spec, teacher_dir):
  """Every protocol x method x seed at the chosen length and λ."""
  runs = []
  for protocol in _PROTOCOLS.value:
    for method in _METHODS.value:
      weights = chosen.get(_family(method), {})
      for seed in range(_SEEDS.value):
        metrics = _run(_name(protocol, method, weights, steps, seed),
                       _student_config(method, protocol, seed, teacher_spec,
                                       teacher_dir, weights, steps))
        runs.append(dict(protocol=protocol, method=method, seed=seed,
                         metrics=metrics))
  return runs


def main(argv):
  del argv
  if not _MANUAL_DIR.value:
    raise app.UsageError("--manual_dir (or $PTBXL_DIR) must point at PTB-XL.")
  # Hundreds of runs compile the same few steps: keep the executables.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(_OUT.value), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  teacher_spec, teachers = _teacher()
  teacher = teachers[teacher_spec]
  steps, curve = _length(teacher_spec, teacher["workdir"])
  chosen, tuning = _tune(steps, teacher_spec, teacher["workdir"])
  runs = _table(steps, chosen, teacher_spec, teacher["workdir"])
  result = dict(
      folds=_FOLDS.value, manual_dir=_MANUAL_DIR.value,
      student=_STUDENT.value, teacher=teacher_spec,
      teacher_candidates={k: {m: v[m] for m in ("validation/macro_auc",
                                                 "test/macro_auc")}
                          for k, v in teachers.items()},
      teacher_metrics=teacher,
      tuning=dict(protocols=_TUNE_PROTOCOLS.value, grid=_GRID.value,
                  evl_grid=dict(_EVL_GRID), scores=tuning, chosen=chosen),
      steps=dict(teacher=_TEACHER_STEPS.value, student=steps,
                 task_only_validation=curve, flat_tol=_FLAT_TOL.value),
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
