r"""docs/results.md (+ figures) from the JSON of benchmarks/kd_table.py.

  python benchmarks/kd_report.py --table=workdir/kd_table/kd_table.json \
      --docs=docs/results.md

Every number in the document is read from the JSON (or from the run
workdirs it names: predictions.npz for ROC curves, metrics.jsonl for
learning curves, checkpoints for the OT plan); nothing is typed by hand.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evl_ecg_jax.eval import stats  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_TABLE = flags.DEFINE_string("table", "workdir/kd_table/kd_table.json",
                             "kd_table.py's JSON.")
_DOCS = flags.DEFINE_string("docs", "docs/results.md", "Markdown to write.")
_SHOWN = ("ce", "kd", "evl")  # methods drawn in the ROC figure


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _run(result, protocol, method, seed=0):
  for r in result["runs"]:
    if (r["protocol"], r["method"], r["seed"]) == (protocol, method, seed):
      return r
  return None


def bar_chart(result, path):
  """Test macro-AUC mean ± std per method, one panel per protocol."""
  plt = _plt()
  summary = result["summary"]
  fig, axes = plt.subplots(1, len(summary), figsize=(4 * len(summary), 3.2),
                           squeeze=False)
  for ax, (protocol, s) in zip(axes[0], summary.items()):
    names = list(s["rows"])
    means = [s["rows"][m]["test_auc"][0] for m in names]
    stds = [s["rows"][m]["test_auc"][1] for m in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#4c72b0")
    ax.axhline(s["teacher_test_auc"], color="#c44e52", ls="--",
               label="teacher")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    low = min(m - e for m, e in zip(means, stds))
    ax.set_ylim(max(0.0, low - 0.02), min(1.0, max(
        means + [s["teacher_test_auc"]]) + 0.02))
    ax.set_title(protocol, fontsize=9)
    ax.set_ylabel("test macro-AUC", fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def roc_curves(result, protocol, path):
  """Per-class test ROC of the teacher and of seed 0 of CE / KD / EVL."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  plt = _plt()
  sources = {"teacher": result["teacher_metrics"]["workdir"]}
  for method in _SHOWN:
    run = _run(result, protocol, method)
    if run is not None:
      sources[method] = run["metrics"]["workdir"]
  preds = {}
  for name, workdir in sources.items():
    path_npz = os.path.join(workdir, "predictions.npz")
    if os.path.exists(path_npz):
      preds[name] = np.load(path_npz)
  if not preds:
    return False
  classes = list(result["summary"][protocol]["rows"]["ce"]["per_class_auc"])
  fig, axes = plt.subplots(1, len(classes), figsize=(3 * len(classes), 3),
                           squeeze=False)
  for c, (ax, name) in enumerate(zip(axes[0], classes)):
    for label, p in preds.items():
      fpr, tpr, _ = skm.roc_curve(p["test/labels"][:, c], p["test/probs"][:, c])
      ax.plot(fpr, tpr, lw=1, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_title(name, fontsize=9)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def learning_curves(result, protocol, path):
  """Training loss and its task term of seed 0 of each method."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(8, 3))
  for r in result["runs"]:
    if r["protocol"] != protocol or r["seed"] != 0:
      continue
    with open(os.path.join(r["metrics"]["workdir"], "metrics.jsonl"),
              encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    rows = [row for row in rows if "train/loss" in row]
    for ax, key in zip(axes, ("train/loss", "train/ce")):
      ax.plot([row["step"] for row in rows], [row[key] for row in rows],
              lw=1, label=r["method"])
      ax.set_title(f"{key} ({protocol}, seed 0)", fontsize=9)
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def ot_plan_figure(result, protocol, path):
  """The OT plan between teacher and (projected) student tokens of the
  first test ECG, for the EVL student of seed 0."""
  run = _run(result, protocol, "evl")
  if run is None:
    return False
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from evl_ecg_jax import checkpoint
  from evl_ecg_jax import losses
  from evl_ecg_jax import models
  from evl_ecg_jax.data import pipeline
  from evl_ecg_jax.losses import evl
  import ml_collections
  # pylint: enable=g-import-not-at-top
  workdir = run["metrics"]["workdir"]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  ecg = jnp.asarray(next(pipeline.eval_batches(config.data, "test"))["ecg"][:1])
  n = len(config.data.class_names)
  student = models.get(config.student, n)
  teacher = models.get(config.teacher, n)
  s_params = checkpoint.load_params(workdir)
  t_params = checkpoint.load_params(config.teacher.init)["model"]
  objective = losses.make_objective(**config.loss)
  _, s_feats = student.apply({"params": s_params["model"]}, ecg,
                             taps=objective.model_taps("student"))
  _, t_feats = teacher.apply({"params": t_params}, ecg,
                             taps=objective.model_taps("teacher"))
  head = objective.heads.apply({"params": s_params["heads"]}, s_feats, t_feats)
  plan = losses.ot.transport_plan(
      evl.unit_tokens(t_feats[config.loss.teacher_ot_tap][0]),
      evl.unit_tokens(head["ot_student"][0]), epsilon=config.loss.ot_epsilon)
  plan = np.asarray(jax.device_get(plan))
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4, 5))
  ax.imshow(plan * plan.size, aspect="auto", cmap="magma",
            interpolation="nearest")
  ax.set_xlabel("student token")
  ax.set_ylabel("teacher token")
  ax.set_title(f"OT plan x N·M, one test ECG ({protocol})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def _per_class_table(summary):
  lines = []
  for protocol, s in summary.items():
    classes = list(next(iter(s["rows"].values()))["per_class_auc"])
    lines += [f"**{protocol}**", "",
              "| method | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    for method, r in s["rows"].items():
      lines.append(f"| {method} | " + " | ".join(
          f"{r['per_class_auc'][c]:.3f}" for c in classes) + " |")
    lines.append("")
  return "\n".join(lines)


def _verdict(summary):
  """The issue's targets, checked against the numbers."""
  lines = []
  for protocol, s in summary.items():
    rows = s["rows"]
    if "evl" not in rows:
      continue
    gap = rows["evl"].get("gap_closed", float("nan"))
    text = f"- **{protocol}**: EVL closes {gap:.0%} of the teacher–student gap"
    c = s.get("evl_vs_kd")
    if c is not None:
      sig = ("its 95 % CI excludes 0" if c["low"] > 0 or c["high"] < 0
             else "its 95 % CI includes 0")
      text += (f"; EVL − KD = {c['mean']:+.4f} [{c['low']:+.4f}, "
               f"{c['high']:+.4f}] over {c['n']} seeds ({sig})")
    lines.append(text + ".")
  return "\n".join(lines)


def write(result, docs):
  fig_dir = os.path.join(os.path.dirname(docs) or ".", "results")
  os.makedirs(fig_dir, exist_ok=True)
  rel = lambda name: f"results/{name}"
  bar_chart(result, os.path.join(fig_dir, "auc_by_protocol.png"))
  figures = [("Test macro-AUC per protocol (mean ± std over seeds; dashed: "
              "teacher)", rel("auc_by_protocol.png"))]
  for protocol in result["summary"]:
    if roc_curves(result, protocol, os.path.join(fig_dir,
                                                 f"roc_{protocol}.png")):
      figures.append((f"ROC per class, {protocol}, seed 0",
                      rel(f"roc_{protocol}.png")))
    learning_curves(result, protocol,
                    os.path.join(fig_dir, f"curves_{protocol}.png"))
    figures.append((f"Learning curves, {protocol}, seed 0",
                    rel(f"curves_{protocol}.png")))
  first = next(iter(result["summary"]))
  if ot_plan_figure(result, first, os.path.join(fig_dir, "ot_plan.png")):
    figures.append(("OT plan between teacher and student tokens",
                    rel("ot_plan.png")))
  tuning = result["tuning"]
  cand = "\n".join(f"| {k} | {v['validation/macro_auc']:.4f} | "
                   f"{v['test/macro_auc']:.4f} |"
                   for k, v in result["teacher_candidates"].items())
  tune = "\n".join(
      f"| {m} | " + " | ".join(f"{scores[g]:.4f}" for g in tuning["grid"])
      + f" | {next(iter(tuning['chosen'][m].values())):g} |"
      for m, scores in tuning["scores"].items())
  seeds = max(r["seed"] for r in result["runs"]) + 1
  text = f"""# Results on real ECGs

Generated by `python benchmarks/kd_report.py --table={_TABLE.value}` from
the JSON written by `benchmarks/kd_table.py` (see its docstring for the
protocols). Data: PTB-XL at `{result['manual_dir']}`, folds `{result['folds']}`,
superdiagnostic labels, 100 Hz. Student `{result['student']}`; teacher
steps {result['steps']['teacher']}, student steps
{result['steps']['student']}; {seeds} seed(s) per cell.

## Teacher (chosen on validation macro-AUC)

| candidate | validation macro-AUC | test macro-AUC |
|---|---|---|
{cand}

Chosen: **{result['teacher']}**.

## λ per method (chosen on validation, protocol `{tuning['protocol']}`, seed 0)

| method | """ + " | ".join(f"λ = {g}" for g in tuning["grid"]) + """ | chosen |
|---|""" + "---|" * (len(tuning["grid"]) + 1) + f"""
{tune}

## Test metrics (mean ± std over seeds)

Macro-F1 uses per-class thresholds chosen on validation. "Gap closed" is
(method − task-loss-only) / (teacher − task-loss-only) on test macro-AUC.
The paired comparisons are Student-t intervals over per-seed differences;
the best baseline is the one with the highest mean validation AUC.

{stats.markdown(result['summary'])}
## Against the targets

{_verdict(result['summary'])}

## Per-class test AUC (mean over seeds)

{_per_class_table(result['summary'])}
## Figures

""" + "\n\n".join(f"{title}:\n\n![{title}]({path})"
                   for title, path in figures) + """

## CinC 2020/21

The shared CinC folder holds 35 records (34 at 500 Hz, 1 at 1000 Hz): too
few for a test split that could separate methods (a single-model 95 % CI
on AUC over a dozen test records spans tens of points), so no CinC table
is reported.
"""
  with open(docs, "w", encoding="utf-8") as f:
    f.write(text)


def main(argv):
  del argv
  with open(_TABLE.value, encoding="utf-8") as f:
    result = json.load(f)
  write(result, _DOCS.value)
  print(f"Wrote {_DOCS.value}")


if __name__ == "__main__":
  app.run(main)
