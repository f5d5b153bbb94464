"""Statistics of a method comparison over seeds (benchmarks/kd_table.py).

Pure functions of run records {"protocol", "method", "seed", "metrics"}
(metrics as written to metrics.json), so the report can be recomputed from
the JSON alone.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

BASELINES = ("kd", "fitnet", "rkd", "dkd", "tinybert", "uld")


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return float(values.mean()), std


def paired_ci(a, b, level: float = 0.95) -> dict:
  """Paired comparison of per-seed scores a − b: mean, t-interval, p-value.

  Student-t interval on the n per-seed differences (n − 1 degrees of
  freedom); with one seed the interval is undefined (NaN).
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = len(d)
  mean = float(d.mean())
  if n < 2:
    return dict(mean=mean, low=float("nan"), high=float("nan"),
                p=float("nan"), n=n)
  sem = d.std(ddof=1) / np.sqrt(n)
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1) * sem)
  p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue) if sem > 0 else 0.0
  return dict(mean=mean, low=mean - half, high=mean + half, p=p, n=n)


def gap_closed(score, student, teacher) -> float:
  """Fraction of the teacher − student gap a method closes: (s − s0) / (t − s0)."""
  gap = teacher - student
  return float((score - student) / gap) if gap != 0 else float("nan")


def _by_seed(runs, protocol, method, key):
  rows = sorted((r for r in runs if r["protocol"] == protocol
                 and r["method"] == method), key=lambda r: r["seed"])
  return [r["seed"] for r in rows], [r["metrics"][key] for r in rows]


def _rows(runs, protocol):
  """{method: mean ± std of the test/validation metrics} of one protocol."""
  rows = {}
  for method in dict.fromkeys(r["method"] for r in runs
                              if r["protocol"] == protocol):
    metrics = [r["metrics"] for r in runs if r["protocol"] == protocol
               and r["method"] == method]
    per_class = sorted(k for k in metrics[0] if k.startswith("test/auc/"))
    rows[method] = dict(
        n=len(metrics),
        test_auc=mean_std([m["test/macro_auc"] for m in metrics]),
        test_f1=mean_std([m.get("test/macro_f1", np.nan) for m in metrics]),
        validation_auc=mean_std([m["validation/macro_auc"]
                                 for m in metrics]),
        per_class_auc={k[len("test/auc/"):]: mean_std(
            [m[k] for m in metrics])[0] for k in per_class})
  return rows


def paired(runs, protocol, a, b, key="test/macro_auc") -> dict:
  """paired_ci of methods a − b over the seeds both have."""
  seeds_a, va = _by_seed(runs, protocol, a, key)
  seeds_b, vb = _by_seed(runs, protocol, b, key)
  common = sorted(set(seeds_a) & set(seeds_b))
  return dict(a=a, baseline=b, **paired_ci(
      [va[seeds_a.index(s)] for s in common],
      [vb[seeds_b.index(s)] for s in common]))


# EVL against: task-only, the paper's EVL, and each ablation (removing a
# term should lower AUC: EVL − ablation > 0).
_EVL_PAIRS = ("ce", "evl_paper", "evl_no_mhca", "evl_no_rel", "evl_no_ot")
_HEAD_PAIRS = ("evl_vs_best", "evl_vs_strongest", "evl_vs_kd")


def summarise(runs, teacher_metrics) -> dict:
  """{protocol: {"rows": {method: stats}, "evl_vs_best": ..., ...}}.

  "evl_vs_best" is EVL − the best baseline chosen on validation (the
  comparison the targets name); "evl_vs_strongest" is EVL − the baseline
  with the highest mean test AUC, the strictest comparison (reported, never
  used to choose anything). "paired" lists EVL − X for X in _EVL_PAIRS;
  "shuffled_retained" is the fraction of EVL's gain over task-only that the
  shuffled-teacher control keeps (transfer: near 0).
  """
  out = {}
  teacher_auc = teacher_metrics["test/macro_auc"]
  for protocol in dict.fromkeys(r["protocol"] for r in runs):
    rows = _rows(runs, protocol)
    summary = dict(rows=rows, teacher_test_auc=teacher_auc, paired=[])
    if "ce" in rows:
      base = rows["ce"]["test_auc"][0]
      for row in rows.values():
        row["gap_closed"] = gap_closed(row["test_auc"][0], base, teacher_auc)
    baselines = [m for m in BASELINES if m in rows]
    if "evl" in rows and baselines:
      # The best baseline is chosen on validation, like every other choice.
      best = max(baselines, key=lambda m: rows[m]["validation_auc"][0])
      strongest = max(baselines, key=lambda m: rows[m]["test_auc"][0])
      for name, other in (("evl_vs_best", best),
                          ("evl_vs_strongest", strongest),
                          ("evl_vs_kd", "kd")):
        if other in rows:
          summary[name] = paired(runs, protocol, "evl", other)
    if "evl" in rows:
      summary["paired"] = [paired(runs, protocol, "evl", m)
                           for m in _EVL_PAIRS if m in rows]
    if {"evl", "evl_shuffled", "ce"} <= set(rows):
      summary["shuffled_retained"] = gap_closed(
          rows["evl_shuffled"]["test_auc"][0], rows["ce"]["test_auc"][0],
          rows["evl"]["test_auc"][0])
    out[protocol] = summary
  return out


def comparisons(s: dict) -> list:
  """[(key, EVL − X)] of one protocol's summary, one per baseline X.

  `key` is the summary field it came from (_HEAD_PAIRS first, then
  "paired"); a baseline named twice (the best baseline is also KD) is
  listed under its first key.
  """
  pairs = [(k, s[k]) for k in _HEAD_PAIRS if k in s]
  pairs += [("paired", c) for c in s.get("paired", [])]
  out, shown = [], set()
  for key, c in pairs:
    if c["baseline"] not in shown:
      shown.add(c["baseline"])
      out.append((key, c))
  return out


def markdown(summary: dict) -> str:
  """One table per protocol: mean ± std over seeds and the paired tests."""
  lines = []
  for protocol, s in summary.items():
    lines += [f"### {protocol} (teacher test macro-AUC "
              f"{s['teacher_test_auc']:.4f})", "",
              "| method | seeds | test macro-AUC | test macro-F1 | "
              "gap closed | validation macro-AUC |",
              "|---|---|---|---|---|---|"]
    for method, r in s["rows"].items():
      gap = r.get("gap_closed", float("nan"))
      lines.append(
          f"| {method} | {r['n']} | {r['test_auc'][0]:.4f} ± "
          f"{r['test_auc'][1]:.4f} | {r['test_f1'][0]:.4f} ± "
          f"{r['test_f1'][1]:.4f} | {gap:+.2f} | "
          f"{r['validation_auc'][0]:.4f} |")
    for _, c in comparisons(s):
      lines.append(
          f"\nEVL − {c['baseline']} (paired over {c['n']} seeds): "
          f"{c['mean']:+.4f}, 95 % CI [{c['low']:+.4f}, {c['high']:+.4f}], "
          f"p = {c['p']:.3f}.")
    if "shuffled_retained" in s:
      lines.append(f"\nThe shuffled-teacher control keeps "
                   f"{s['shuffled_retained']:.0%} of EVL's gain over ce.")
    lines.append("")
  return "\n".join(lines)
