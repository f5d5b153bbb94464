"""docs/results.md is generated from the JSON: its numbers are the JSON's."""

import json
import os
import re
import sys

import numpy as np

from conftest import REPO
from evl_ecg_jax.eval import stats

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import kd_report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _fake_result(tmp_path):
  rng = np.random.default_rng(0)
  runs = []
  for protocol in ("full", "leads_I"):
    for method, mu in (("ce", 0.80), ("kd", 0.81), ("evl", 0.83),
                       ("evl_no_ot", 0.82), ("evl_shuffled", 0.805)):
      for seed in range(3):
        workdir = tmp_path / f"{protocol}_{method}_{seed}"
        workdir.mkdir()
        with open(workdir / "metrics.jsonl", "w") as f:
          for step in (50, 100):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step,
                                "train/ce": 0.5 / step}) + "\n")
            f.write(json.dumps({"step": step, "diag/grad_share/ot": 0.1,
                                "diag/cka/tokens": 0.5}) + "\n")
        labels = (rng.random((40, 2)) < 0.4).astype(np.float32)
        np.savez(workdir / "predictions.npz",
                 **{"test/probs": rng.random((40, 2)),
                    "test/labels": labels})
        auc = mu + 0.01 * rng.normal()
        runs.append(dict(protocol=protocol, method=method, seed=seed,
                         metrics={"test/macro_auc": auc,
                                  "validation/macro_auc": auc,
                                  "test/macro_f1": auc - 0.2,
                                  "test/auc/A": auc, "test/auc/B": auc,
                                  "diag/cka/tokens": auc - 0.3,
                                  "diag/cka/tokens_shuffled": 0.01,
                                  "workdir": str(workdir)}))
  teacher = {"test/macro_auc": 0.9, "validation/macro_auc": 0.91,
             "workdir": str(tmp_path / "none")}
  return dict(folds="shared", manual_dir="/data/ptbxl", student="cnn1d:tiny",
              teacher="cnn1d:small",
              teacher_candidates={"cnn1d:small": teacher},
              teacher_metrics=teacher,
              tuning=dict(protocols=["leads_I"], seeds=2, grid=["0.1", "1"],
                          scores={"kd": {"0.1": 0.8, "1": 0.81},
                                  "evl": [dict(field="ot_weight", value=1.0,
                                               score=0.82)]},
                          chosen={"kd": {"kd_weight": 1.0},
                                  "evl": {"ot_weight": 1.0}}),
              steps=dict(teacher=600, student=300, flat_tol=0.003,
                         task_only_validation={"300": 0.8, "600": 0.81}),
              runs=runs,
              summary=stats.summarise(runs, teacher))


def test_report_numbers_are_the_json_numbers(tmp_path):
  result = _fake_result(tmp_path)
  docs = tmp_path / "docs" / "results.md"
  docs.parent.mkdir()
  kd_report.publish(result, str(docs), str(tmp_path / "table.json"))
  # The published JSON alone regenerates the same document.
  for run in result["runs"]:
    os.remove(os.path.join(run["metrics"]["workdir"], "predictions.npz"))
  first = docs.read_text()
  with open(tmp_path / "table.json") as f:
    kd_report.write(json.load(f), str(docs), str(tmp_path / "table.json"))
  assert docs.read_text() == first
  text = docs.read_text()
  for protocol, s in result["summary"].items():
    for method, row in s["rows"].items():
      mean, std = row["test_auc"]
      assert f"| {method} | 3 | {mean:.4f} ± {std:.4f} |" in text
    for c in [s["evl_vs_best"]] + s["paired"]:
      assert (f"{c['mean']:+.4f}, 95 % CI [{c['low']:+.4f}, "
              f"{c['high']:+.4f}]") in text
    assert {c["baseline"] for c in s["paired"]} == {"ce", "evl_no_ot"}
    # Each target gets its verdict from the same CI.
    ablation = next(c for c in s["paired"] if c["baseline"] == "evl_no_ot")
    verdict = "met" if ablation["low"] > 0 else "missed"
    assert (f"EVL − evl_no_ot: {ablation['mean']:+.4f}") in text
    assert (f"(target, removing the term lowers test AUC: {verdict})"
            in text)
    assert f"keeps {s['shuffled_retained']:.0%} of EVL's gain" in text
    cka = np.mean([r["metrics"]["diag/cka/tokens"] for r in result["runs"]
                   if (r["protocol"], r["method"]) == (protocol, "evl")])
    assert f"| cka/tokens | {cka:.3f} |" in text
  assert "## λ (validation macro-AUC, mean over leads_I, seeds 0–1)" in text
  figures = re.findall(r"\]\((results/[^)]+)\)", text)
  assert "results/auc_by_protocol.png" in figures
  assert "results/diagnostics_full.png" in figures
  assert "results/roc_full.png" in figures and len(figures) == 7
  for fig in figures:
    assert os.path.getsize(docs.parent / fig) > 1000
