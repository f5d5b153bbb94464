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


def roc_curve(labels: np.ndarray, scores: np.ndarray):
  """(fpr, tpr) at every distinct score used as a threshold, from (0, 0)
  to (1, 1); its trapezoidal area is `roc_auc` (tied scores form one
  diagonal step)."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="mergesort")
  labels, scores = labels[order], scores[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
  tp = np.cumsum(labels)[last]
  fp = (last + 1) - tp
  n_pos, n_neg = max(tp[-1], 1), max(fp[-1], 1)
  return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


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


def f1_score(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Binary F1 = 2·TP / (2·TP + FP + FN); 0 when there is nothing to find."""
  labels, predictions = np.asarray(labels) > 0.5, np.asarray(predictions)
  tp = np.sum(labels & predictions)
  denom = 2 * tp + np.sum(~labels & predictions) + np.sum(labels & ~predictions)
  return float(2 * tp / denom) if denom else 0.0


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
  """Threshold t maximising F1 of (scores >= t) (ties: the smallest t).

  Candidates are the observed scores, so the choice is exact; it is made
  on validation and applied unchanged to the test split.
  """
  labels, scores = np.asarray(labels) > 0.5, np.asarray(scores, np.float64)
  candidates = np.unique(scores)
  f1 = [f1_score(labels, scores >= t) for t in candidates]
  return float(candidates[int(np.argmax(f1))])


def multilabel_f1(labels: np.ndarray, scores: np.ndarray, thresholds,
                  class_names) -> dict:
  """{"macro_f1", "f1/<name>"} of `scores >= thresholds` per class."""
  per_class = {f"f1/{name}": f1_score(labels[:, c], scores[:, c] >= t)
               for c, (name, t) in enumerate(zip(class_names, thresholds))}
  return {"macro_f1": float(np.mean(list(per_class.values()))), **per_class}
