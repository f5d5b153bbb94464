"""Classification metrics in numpy (checked against scikit-learn in tests)."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of `x`, ties sharing their average rank."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Boundaries of runs of equal values in sorted order.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
  ends = np.r_[starts[1:], len(x)]
  run_ranks = (starts + ends + 1) / 2.0  # mean of ranks start+1..end
  ranks = np.empty(len(x))
  ranks[order] = np.repeat(run_ranks, ends - starts)
  return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve via the Mann-Whitney U statistic.

  Returns NaN when `labels` holds only one class (AUC undefined).
  """
  labels = np.asarray(labels).astype(bool)
  n_pos = labels.sum()
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _average_ranks(np.asarray(scores, np.float64))
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2)
               / (n_pos * n_neg))


def multilabel_auc(labels: np.ndarray, scores: np.ndarray,
                   class_names) -> dict:
  """Per-class AUC and their macro average over classes where it is defined.

  Args:
    labels: [N, C] multi-hot.
    scores: [N, C] predicted scores.
    class_names: C names.

  Returns:
    {"macro_auc": float, "auc/<name>": float, ...}; classes without both
    positives and negatives get NaN and are left out of the macro mean.
  """
  per_class = {f"auc/{name}": roc_auc(labels[:, c], scores[:, c])
               for c, name in enumerate(class_names)}
  defined = [v for v in per_class.values() if not np.isnan(v)]
  macro = float(np.mean(defined)) if defined else float("nan")
  return {"macro_auc": macro, **per_class}
