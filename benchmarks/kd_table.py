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
docs/evl.md), and in --ablation_protocols its three ablations and
`evl_shuffled` (EVL fed the teacher outputs of another record of the
batch: the control).
Steps (every choice on validation, mean over --tune_protocols and
--tune_seeds):
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
The independent runs of a step go to --workers processes at once, each
on one core's worth of threads: the small models here keep two cores
busy better as two runs than as one (measured: a step on one core costs
1.2x its time on two, so two workers run the table about 1.6x faster).
Writes kd_table.json (every run, the choices, the statistics, and what
the figures need) and kd_table.md under --out, then publishes the JSON to
docs/results/kd_table.json and docs/results.md (`benchmarks/kd_report.py`
regenerates the document from that JSON alone).
"""

from __future__ import annotations

from concurrent import futures
import json
import multiprocessing
import os
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import kd_report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import console  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
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
    "methods", ["ce", "kd", "fitnet", "rkd", "dkd", "tinybert", "uld", "crd",
                "dist", "evl_paper", "evl", "evl_no_mhca", "evl_no_ot", "evl_no_rel",
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
    "Protocols whose mean validation macro-AUC (over --tune_seeds) picks "
    "the student length and every λ (regimes where the teacher knows more "
    "than the student sees).")
_TUNE_SEEDS = flags.DEFINE_integer(
    "tune_seeds", 1, "Seeds (0, 1, ...) whose mean validation macro-AUC "
    "picks the student length and every λ. On the shared subset's "
    "180-record validation fold two seeds of one setting differ by up to "
    "0.017 (docs/evl.md), more than most λ it chooses between; 2 makes "
    "the table about a quarter more runs than 1.")
_WORKERS = flags.DEFINE_integer(
    "workers", 2, "Processes running independent runs at once (each with "
    "one intra-op thread when > 1).")
_ABLATION_PROTOCOLS = flags.DEFINE_list(
    "ablation_protocols", ["leads_I", "labels"],
    "Protocols with EVL's ablations and the shuffled-teacher control (where "
    "the targets of issue #19 are set; the other protocols keep the "
    "baselines, evl_paper and evl).")
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
# The λ fields (of config.loss) each method's grid value sets (others keep
# the config's).
_W = "terms.{}.weight".format
_TUNED = {
    "kd": (_W("kd"),), "fitnet": (_W("fitnet"),), "rkd": (_W("rkd"),),
    "dkd": (_W("dkd"),), "tinybert": (_W("tinybert"),), "uld": (_W("uld"),),
    "crd": (_W("crd"),), "dist": (_W("dist"),),
    "evl_paper": (_W("mhca"), _W("relation"), _W("ot")),
}
# EVL's λ per term, tuned one at a time in this order from configs'
# defaults (λ_kd: the optional logit-KD term, 0 = off).
_EVL_GRID = ((_W("relation"), (0.3, 1.0, 3.0)),
             (_W("ot"), (0.3, 1.0, 3.0)),
             (_W("mhca"), (0.01, 0.1, 1.0)),
             (_W("kd"), (0.0, 1.0)))


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


def _fit(config, workdir, cache_dir):
  """One run (in this process or a worker's)."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("Run %s", os.path.basename(workdir))
  loop.fit(config, workdir)
  # Hundreds of runs in one process: drop the compiled executables of
  # finished runs (XLA:CPU segfaulted once, compiling, after ~100 runs
  # without this; the table resumes from the finished runs either way).
  jax.clear_caches()


def _init_worker(parent, argv, verbosity):
  """A worker stops as soon as the table's process is gone (killed or
  failed), instead of finishing its run in a workdir a rerun will use;
  its console is as quiet as the parent's: it parses the parent's flags
  (a spawned interpreter has none) and logs what the parent logs to the
  same log.txt (libraries' INFO lines went to its stderr)."""
  flags.FLAGS(argv)
  logging.use_absl_handler()
  logging.set_verbosity(verbosity)
  console.quiet(_OUT.value)
  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True).start()


def _pool():
  """The worker processes (None: run here). Each worker's XLA:CPU keeps to
  one intra-op thread; set before the spawned interpreter imports jax."""
  if _WORKERS.value <= 1:
    return None
  env = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (env + " --xla_cpu_multi_thread_eigen=false "
                             "intra_op_parallelism_threads=1").strip()
  try:
    return futures.ProcessPoolExecutor(
        _WORKERS.value, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(os.getpid(), sys.argv,
                                             logging.get_verbosity()))
  finally:
    os.environ["XLA_FLAGS"] = env


def _run_all(jobs):
  """{name: config} -> {name: metrics.json + workdir}: runs (or reuses) the
  independent runs, --workers at a time; a failed run raises here."""
  workdirs = {name: os.path.join(_OUT.value, "runs", name) for name in jobs}
  todo = [n for n in jobs if not _runs.reusable(jobs[n], workdirs[n])]
  cache = os.path.join(os.path.abspath(_OUT.value), "jax_cache")
  if _POOL[0] is None or len(todo) <= 1:
    for name in todo:
      _fit(jobs[name], workdirs[name], cache)
  else:
    for done in futures.as_completed([_POOL[0].submit(
        _fit, jobs[n], workdirs[n], cache) for n in todo]):
      done.result()
  out = {}
  for name, workdir in workdirs.items():
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
      out[name] = dict(json.load(f), workdir=workdir)
  return out


_POOL = [None]  # main() sets it


def _teacher():
  """Trains every candidate; returns (workdir, its family:size, all)."""
  jobs = {}
  for spec in _TEACHERS.value:
    family, size = spec.split(":")
    config = _config(f"mode=train_teacher,teacher={family},"
                     f"teacher_size={size}", 0, {})
    _set_steps(config, _TEACHER_STEPS.value)
    jobs[spec] = (f"teacher_{family}_{size}", config)
  done = _run_all(dict(jobs.values()))
  candidates = {spec: done[name] for spec, (name, _) in jobs.items()}
  best = max(candidates,
             key=lambda k: candidates[k]["validation/macro_auc"])
  return best, candidates


def _student_config(method, protocol, seed, teacher_spec, teacher_dir,
                    weights, steps, diagnose=True):
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
    loss[f"loss.{_W(off)}"] = 0.0
  # The teacher is frozen and no augmentation is on: read its outputs from
  # the cache (train/teacher_store.py) instead of running it every step.
  # Diagnostics (their own compiles) only where the report draws them.
  config = _config(arg, seed, {
      **overrides, **loss, "teacher.init": teacher_dir,
      "teacher.cache_features": method != "ce",
      "eval.diagnostics": diagnose and method.startswith("evl")})
  _set_steps(config, steps)
  return config


def _name(prefix, method, weights, steps, seed):
  """The λ and the length are part of the name: a rerun with other choices
  never reuses a run made with different ones."""
  tag = "_".join(f"{k.split('.')[1]}{v:g}" for k, v in sorted(weights.items()))
  return f"{prefix}_{method}{'_' + tag if tag else ''}_s{steps}_seed{seed}"


def _validation(candidates, teacher_spec, teacher_dir):
  """[(method, weights, steps)] -> [mean validation macro-AUC over the
  tuning protocols and --tune_seeds seeds], the runs made together (no
  diagnostics)."""
  cells = [(p, seed) for p in _TUNE_PROTOCOLS.value
           for seed in range(_TUNE_SEEDS.value)]
  jobs = {}
  for method, weights, steps in candidates:
    for protocol, seed in cells:
      jobs[_name(f"tune_{protocol}", method, weights, steps, seed)] = (
          _student_config(method, protocol, seed, teacher_spec, teacher_dir,
                          weights, steps, diagnose=False))
  done = _run_all(jobs)
  return [float(np.mean([
      done[_name(f"tune_{p}", method, weights, steps, seed)][
          "validation/macro_auc"] for p, seed in cells]))
          for method, weights, steps in candidates]


def _length(teacher_spec, teacher_dir):
  """The student length: the shortest of --steps_grid whose task-only
  validation AUC is within --flat_tol of the best; and the curve."""
  lengths = [int(n) for n in _STEPS_GRID.value]
  scores = _validation([("ce", {}, n) for n in lengths], teacher_spec,
                       teacher_dir)
  curve = dict(zip(lengths, scores))
  best = max(curve.values())
  steps = min(n for n, v in curve.items() if v >= best - _FLAT_TOL.value)
  return steps, curve


def _tune_evl(steps, teacher_spec, teacher_dir, first=()):
  """EVL's λ per term, one term at a time (_EVL_GRID); returns the choice
  and every (field, value, score) tried. `first`: other candidates run
  with the first term's grid (their scores are returned too)."""
  loss = default.get_config("loss=evl").loss
  chosen = {f: loss.terms[f.split(".")[1]].weight for f, _ in _EVL_GRID}
  tried, others = [], None
  for field, values in _EVL_GRID:
    grid = [("evl", dict(chosen, **{field: float(v)}), steps)
            for v in values]
    scores = _validation(grid + list(first if others is None else ()),
                         teacher_spec, teacher_dir)
    if others is None:
      others = scores[len(grid):]
    for (_, weights, _), value, score in zip(grid, values, scores):
      tried.append(dict(field=field, value=float(value), weights=weights,
                        score=score))
    chosen[field] = float(values[int(np.argmax(scores[:len(grid)]))])
  return chosen, tried, others


def _tune(steps, teacher_spec, teacher_dir):
  """{method family: {λ field: value}} chosen on validation, and the runs.
  The baselines' grids run beside EVL's first term."""
  families = [m for m in dict.fromkeys(_family(m) for m in _METHODS.value)
              if m != "ce"]
  grid = [(m, {f: float(v) for f in _TUNED[m]}, steps) for m in families
          if m != "evl" for v in _GRID.value]
  chosen, runs = {}, {}
  if "evl" in families:
    chosen["evl"], runs["evl"], scores = _tune_evl(steps, teacher_spec,
                                                   teacher_dir, grid)
  else:
    scores = _validation(grid, teacher_spec, teacher_dir)
  for (method, weights, _), score in zip(grid, scores):
    runs.setdefault(method, {})[f"{next(iter(weights.values())):g}"] = score
  for method in runs:
    if method != "evl":
      best = max(runs[method], key=runs[method].get)
      chosen[method] = {f: float(best) for f in _TUNED[method]}
  return chosen, runs


def _table(steps, chosen, teacher_spec, teacher_dir):
  """Every protocol x method x seed at the chosen length and λ (EVL's
  ablations and control in --ablation_protocols only)."""
  cells, jobs = [], {}
  for protocol in _PROTOCOLS.value:
    for method in _METHODS.value:
      if (method.startswith("evl_no_") or method == "evl_shuffled") and (
          protocol not in _ABLATION_PROTOCOLS.value):
        continue
      weights = chosen.get(_family(method), {})
      for seed in range(_SEEDS.value):
        name = _name(protocol, method, weights, steps, seed)
        cells.append((protocol, method, seed, name))
        jobs[name] = _student_config(method, protocol, seed, teacher_spec,
                                     teacher_dir, weights, steps)
  # Protocol by protocol (a table cut short still has whole protocols),
  # the slow (EVL) runs first within each, so the workers finish together.
  order = {name: (_PROTOCOLS.value.index(p), not m.startswith("evl"))
           for p, m, _, name in cells}
  done = _run_all(dict(sorted(jobs.items(), key=lambda kv: order[kv[0]])))
  return [dict(protocol=p, method=m, seed=seed, metrics=done[name])
          for p, m, seed, name in cells]


def main(argv):
  del argv
  if not _MANUAL_DIR.value:
    raise app.UsageError("--manual_dir (or $PTBXL_DIR) must point at PTB-XL.")
  console.quiet(_OUT.value)
  # Hundreds of runs compile the same few steps: keep the executables
  # (_fit points every process at one persistent cache).
  _POOL[0] = _pool()
  try:
    _main()
  finally:
    if _POOL[0] is not None:  # a failed run: stop the others now
      _POOL[0].shutdown(wait=False, cancel_futures=True)


def _main():
  """The four steps of the module docstring, then the JSON and the report."""
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
      tuning=dict(protocols=_TUNE_PROTOCOLS.value, seeds=_TUNE_SEEDS.value,
                  grid=_GRID.value,
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
