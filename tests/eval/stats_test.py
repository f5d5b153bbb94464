"""Comparison statistics: paired t-interval, gap closed, summaries."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from evl_ecg_jax.eval import stats


def test_paired_ci_hand_case():
  # Differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, sem 0.01/sqrt(3).
  out = stats.paired_ci([0.81, 0.83, 0.82], [0.80, 0.80, 0.80])
  half = scipy_stats.t.ppf(0.975, 2) * 0.01 / np.sqrt(3)
  assert out["mean"] == pytest.approx(0.02)
  assert out["low"] == pytest.approx(0.02 - half)
  assert out["high"] == pytest.approx(0.02 + half)
  assert out["p"] == pytest.approx(
      scipy_stats.ttest_rel([0.81, 0.83, 0.82], [0.8] * 3).pvalue)
  assert np.isnan(stats.paired_ci([0.9], [0.8])["low"])


def test_gap_closed():
  assert stats.gap_closed(0.85, 0.80, 0.90) == pytest.approx(0.5)
  assert stats.gap_closed(0.78, 0.80, 0.90) == pytest.approx(-0.2)
  assert np.isnan(stats.gap_closed(0.8, 0.8, 0.8))


def _runs():
  rng = np.random.default_rng(0)
  runs = []
  for method, mu in (("ce", 0.80), ("kd", 0.82), ("fitnet", 0.81),
                     ("evl", 0.85)):
    for seed in range(4):
      auc = mu + 0.005 * rng.normal()
      runs.append(dict(protocol="leads_I", method=method, seed=seed,
                       metrics={"test/macro_auc": auc,
                                "validation/macro_auc": auc + 0.01,
                                "test/macro_f1": auc - 0.1,
                                "test/auc/NORM": auc}))
  return runs


def test_summarise_rows_gap_and_paired_comparison():
  runs = _runs()
  out = stats.summarise(runs, {"test/macro_auc": 0.90})["leads_I"]
  evl = [r["metrics"]["test/macro_auc"] for r in runs if r["method"] == "evl"]
  kd = [r["metrics"]["test/macro_auc"] for r in runs if r["method"] == "kd"]
  assert out["rows"]["evl"]["test_auc"] == pytest.approx(
      (np.mean(evl), np.std(evl, ddof=1)))
  ce = np.mean([r["metrics"]["test/macro_auc"] for r in runs
                if r["method"] == "ce"])
  assert out["rows"]["evl"]["gap_closed"] == pytest.approx(
      (np.mean(evl) - ce) / (0.90 - ce))
  # kd has the best validation AUC of the baselines.
  assert out["evl_vs_best"]["baseline"] == "kd"
  assert out["evl_vs_best"]["mean"] == pytest.approx(np.mean(evl) - np.mean(kd))
  assert out["evl_vs_best"]["low"] > 0
  text = stats.markdown({"leads_I": out})
  assert "| evl | 4 |" in text and "EVL − kd (paired over 4 seeds)" in text


def test_summarise_strongest_baseline_is_read_on_test_not_validation():
  # rkd leads on test, dkd on validation: the target comparison stays the
  # validation choice and the strictest one is reported beside it.
  runs = []
  for method, test, val in (("ce", 0.80, 0.80), ("dkd", 0.81, 0.86),
                            ("rkd", 0.84, 0.82), ("evl", 0.85, 0.85)):
    for seed in range(3):
      runs.append(dict(protocol="labels", method=method, seed=seed,
                       metrics={"test/macro_auc": test + 0.001 * seed ** 2,
                                "validation/macro_auc": val}))
  out = stats.summarise(runs, {"test/macro_auc": 0.90})["labels"]
  assert out["evl_vs_best"]["baseline"] == "dkd"
  assert out["evl_vs_strongest"]["baseline"] == "rkd"
  assert out["evl_vs_strongest"]["mean"] == pytest.approx(0.01)
  text = stats.markdown({"labels": out})
  assert "EVL − dkd (paired" in text and "EVL − rkd (paired" in text
