r"""Edge latency: one 10-s 12-lead ECG at a time, teacher vs exported student.

  python benchmarks/latency.py --out=workdir/benchmarks \
      [--teacher=workdir/demo/teacher] [--student=workdir/demo/student_evl]

(`make demo` trains both.) Exports the student (float32, float16, int8) and
the teacher (float32) with evl_ecg_jax.export, then times, per case and
thread setting, `--calls` single-ECG predictions on real test-split ECGs:
the teacher and the student in JAX (jitted; host -> device copy included)
and their ONNX graphs in onnxruntime. Each case runs in its own process,
pinned to one core for "1 thread" (JAX: XLA's thread pools also set to one
thread; onnxruntime: intra/inter-op threads 1), and to every core for "all
threads", so peak memory (ru_maxrss) is the case's alone; "model MB" is the
peak minus the process's size after its imports. Cases run interleaved,
`--rounds` times (the median round is kept), so drift on a noisy machine
hits every case alike. Writes latency.json and latency.md with the targets
of issue 11: student int8 <= 5 ms per ECG on one core, >= 10x faster than
the teacher, <= 1 AUC point below the JAX student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_TEACHER = flags.DEFINE_string("teacher", "workdir/demo/teacher",
                               "Workdir of the trained teacher.")
_STUDENT = flags.DEFINE_string("student", "workdir/demo/student_evl",
                               "Workdir of the distilled student.")
_CALLS = flags.DEFINE_integer("calls", 200, "Timed predictions per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_WORKER = flags.DEFINE_string("worker", "", "(internal) case to time.")
_THREADS = flags.DEFINE_integer("threads", 0, "(internal) 1 or 0 (all).")
_ECG = flags.DEFINE_string("ecg", "", "(internal) .npy of test ECGs.")
_PRESETS = flags.DEFINE_list(
    "teacher_presets", ["small", "base"],
    "ViT1D teacher sizes also timed in JAX, untrained (latency only): the "
    "demo's tiny teacher is itself edge-sized.")
_PRESET_CALLS = flags.DEFINE_integer("preset_calls", 20,
                                     "Timed predictions per preset round.")

# Issue 11's targets.
MAX_INT8_MS, MIN_SPEEDUP, MAX_AUC_LOSS = 5.0, 10.0, 1.0
# XLA:CPU on one thread: no Eigen pool, one intra-op thread.
_XLA_ONE_THREAD = ("--xla_cpu_multi_thread_eigen=false "
                   "intra_op_parallelism_threads=1")


def _cases(teacher_export, student_export):
  """case -> (runtime, workdir | .onnx path | ViT1D preset)."""
  onnx = lambda d, p: os.path.join(d, f"model_{p}.onnx")
  presets = {f"teacher ViT1D {size} (untrained), JAX": ("preset", size)
             for size in _PRESETS.value}
  return {**presets,
      "teacher, JAX": ("jax", _TEACHER.value),
      "teacher, ONNX float32": ("onnx", onnx(teacher_export, "float32")),
      "student, JAX": ("jax", _STUDENT.value),
      "student, ONNX float32": ("onnx", onnx(student_export, "float32")),
      "student, ONNX float16": ("onnx", onnx(student_export, "float16")),
      "student, ONNX int8": ("onnx", onnx(student_export, "int8")),
  }


def _status_mb(field: str) -> float:
  """VmRSS (now) or VmHWM (peak) of this process, in MB. Not ru_maxrss,
  which Linux carries over from the parent across fork + exec."""
  with open("/proc/self/status") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith(field))
  return kb / 1024


def _predictor(kind: str, source: str, threads: int):
  """(one-ECG predict function, size on disk in bytes) of a case."""
  if kind == "onnx":
    from evl_ecg_jax.export import runtime  # pylint: disable=g-import-not-at-top
    sess = runtime.session(source, threads=threads)
    return (lambda x: sess.run(None, {"ecg": x})[0]), os.path.getsize(source)
  import jax  # pylint: disable=g-import-not-at-top
  if kind == "preset":
    fn, params = _preset(source)
  else:
    from evl_ecg_jax.export import trained as trained_lib  # pylint: disable=g-import-not-at-top
    trained = trained_lib.load(source, "best")
    fn, params = jax.jit(trained.probabilities()), trained.params
  size = sum(x.nbytes for x in jax.tree.leaves(params))
  return (lambda x: fn(x).block_until_ready()), size


def _preset(size: str):
  """(jitted probabilities, params) of an untrained ViT1D teacher preset."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _REPO)
  from configs import default  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.export import trained as trained_lib  # pylint: disable=g-import-not-at-top
  config = default.get_config(f"teacher_size={size}")
  model = models.get(config.teacher, len(config.data.class_names))
  params = models.init_params(model, jax.random.PRNGKey(0),
                              jax.numpy.zeros((1, 1000, 12)))
  return jax.jit(trained_lib.probabilities(model, params)), params


def _worker(case: str) -> None:
  """Times one case in this process; prints its JSON result."""
  kind, source = case.split(":", 1)
  threads = _THREADS.value
  if threads == 1:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  if kind != "onnx":
    import jax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from evl_ecg_jax.export import trained  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  else:
    import onnxruntime  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  ecg = np.load(_ECG.value)
  base = _status_mb("VmRSS")
  predict, size = _predictor(kind, source, threads)
  calls = _PRESET_CALLS.value if kind == "preset" else _CALLS.value
  for i in range(min(20, calls)):  # warm-up (and compilation)
    predict(ecg[i % len(ecg)][None])
  times = []
  for i in range(calls):
    x = ecg[i % len(ecg)][None]
    start = time.perf_counter()
    predict(x)
    times.append(time.perf_counter() - start)
  peak = _status_mb("VmHWM")
  print(json.dumps({"ms": [1e3 * t for t in times], "bytes": size,
                    "peak_mb": peak, "model_mb": peak - base}))


def _run(kind, source, threads, ecg_path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if threads == 1 and kind != "onnx":
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""),
                                              _XLA_ONE_THREAD]))
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--worker={kind}:{source}",
       f"--threads={threads}", f"--ecg={ecg_path}",
       f"--calls={_CALLS.value}", f"--preset_calls={_PRESET_CALLS.value}"],
      cwd=_REPO, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{kind} {source} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(out):
  """Student: every precision; teacher: float32. Returns the reports."""
  from evl_ecg_jax.export import builder  # pylint: disable=g-import-not-at-top
  student = builder.export(_STUDENT.value, os.path.join(out, "student"))
  teacher = builder.export(_TEACHER.value, os.path.join(out, "teacher"),
                           builder.Options(precisions=("float32",)))
  return teacher, student


def _test_ecgs(path, n=64):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(
      checkpoint.load_config(_STUDENT.value)).data
  np.save(path, pipeline.split_records(data, "test", n)["ecg"]
          .astype(np.float32))


def _summary(results, teacher, student):
  """Per case and threads: median-round p50/p95, sizes, memory, AUC."""
  auc = {"teacher": teacher["variants"]["float32"]["reference_macro_auc"],
         "student, JAX": student["variants"]["float32"][
             "reference_macro_auc"]}
  for p, v in student["variants"].items():
    auc[f"student, ONNX {p}"] = v["macro_auc"]
  auc["teacher, ONNX float32"] = teacher["variants"]["float32"]["macro_auc"]
  auc.update({f"teacher ViT1D {size} (untrained), JAX": float("nan")
              for size in _PRESETS.value})
  summary = {}
  for (case, threads), rounds in results.items():
    p50s = [np.percentile(r["ms"], 50) for r in rounds]
    r = rounds[int(np.argsort(p50s)[len(p50s) // 2])]
    summary[f"{case} | {threads}"] = {
        "case": case, "threads": threads,
        "p50_ms": float(np.percentile(r["ms"], 50)),
        "p95_ms": float(np.percentile(r["ms"], 95)),
        "bytes": r["bytes"], "peak_mb": r["peak_mb"],
        "model_mb": r["model_mb"],
        "test_macro_auc": auc.get(case, auc.get(case.split(",")[0])),
        "calls": len(r["ms"])}
  return summary


def _targets(summary):
  one = lambda case: summary[f"{case} | 1"]
  int8 = one("student, ONNX int8")
  teachers = [s["case"] for s in summary.values()
              if s["case"].startswith("teacher") and s["threads"] == 1]
  speedups = {t: one(t)["p50_ms"] / int8["p50_ms"] for t in teachers}
  loss = 100 * (one("student, JAX")["test_macro_auc"]
                - int8["test_macro_auc"])
  demo = ("teacher, JAX", "teacher, ONNX float32")
  return {
      "int8_p50_ms_one_core": int8["p50_ms"],
      "int8_within_5ms": int8["p50_ms"] <= MAX_INT8_MS,
      "speedup_one_core": speedups,
      "speedup_at_least_10x_vs_its_teacher": min(
          speedups[t] for t in demo) >= MIN_SPEEDUP,
      "int8_auc_loss_points": loss,
      "int8_auc_loss_within_1pt": loss <= MAX_AUC_LOSS}


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _timing  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(os.path.join(_OUT.value, "latency_export"))
  for workdir in (_TEACHER.value, _STUDENT.value):
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      sys.exit(f"{workdir}: no checkpoints; run `make demo` first (or pass "
               "--teacher / --student).")
  teacher, student = _export(out)
  ecg_path = os.path.join(out, "test_ecgs.npy")
  _test_ecgs(ecg_path)
  cases = _cases(os.path.join(out, "teacher"), os.path.join(out, "student"))
  results = {}
  for _ in range(_ROUNDS.value):
    for case, (kind, source) in cases.items():
      for threads in (1, 0):
        results.setdefault((case, threads), []).append(
            _run(kind, source, threads, ecg_path))
  summary = _summary(results, teacher, student)
  targets = _targets(summary)
  rows = [[s["case"], "1" if s["threads"] == 1 else f"all ({os.cpu_count()})",
           f"{s['p50_ms']:.3f}", f"{s['p95_ms']:.3f}",
           f"{s['bytes'] / 1e6:.3f}", f"{s['peak_mb']:.0f}",
           f"{s['model_mb']:.1f}", f"{s['test_macro_auc']:.4f}",
           f"{targets['speedup_one_core'].get(s['case'], float('nan')):.1f}x"
           if s["threads"] == 1 and s["case"].startswith("teacher") else ""]
          for s in summary.values()]
  table = _timing.write_report(
      _OUT.value, "latency",
      {"cases": summary, "targets": targets, "calls": _CALLS.value,
       "rounds": _ROUNDS.value, "cpu_count": os.cpu_count(),
       "teacher": _TEACHER.value, "student": _STUDENT.value},
      ["case", "threads", "p50 ms", "p95 ms", "MB on disk", "peak RSS MB",
       "model MB", "test macro-AUC", "student int8 speed-up"], rows)
  print(table)
  print(json.dumps(targets, indent=2))


if __name__ == "__main__":
  app.run(main)
