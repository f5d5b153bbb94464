"""Parity of an exported model with the JAX model it came from.

On a labelled split: the largest and mean |Δ probability| over every record
and class, each model's macro ROC-AUC, and ΔAUC in AUC points (×100).
Bounds (issue 11, docs/deploy.md): the float32 graph must reproduce the JAX
probabilities to 1e-4; the quantised graphs may move the macro AUC by at
most 0.5 points.
"""

from __future__ import annotations

import numpy as np

from evl_ecg_jax.eval import metrics as metrics_lib

# precision -> (measure, bound): the export fails its check above the bound.
BOUNDS = {"float32": ("max_abs_diff", 1e-4),
          "float16": ("abs_delta_auc_points", 0.5),
          "int8": ("abs_delta_auc_points", 0.5)}


def compare(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray,
            class_names) -> dict:
  """Parity measures of `probs` against `reference` ([N, C] each)."""
  if reference.shape != probs.shape:
    raise ValueError(f"probabilities of shape {probs.shape}; the reference "
                     f"has {reference.shape}.")
  diff = np.abs(probs.astype(np.float64) - reference.astype(np.float64))
  ref_auc = metrics_lib.multilabel_auc(labels, reference,
                                       class_names)["macro_auc"]
  auc = metrics_lib.multilabel_auc(labels, probs, class_names)["macro_auc"]
  delta = 100.0 * (auc - ref_auc)
  return {"n": int(len(probs)), "max_abs_diff": float(diff.max()),
          "mean_abs_diff": float(diff.mean()), "macro_auc": float(auc),
          "reference_macro_auc": float(ref_auc),
          "delta_auc_points": float(delta),
          "abs_delta_auc_points": float(abs(delta))}


def check(precision: str, measures: dict) -> dict:
  """{"measure", "bound", "ok"} of `precision`'s bound on `measures`."""
  measure, bound = BOUNDS[precision]
  return {"measure": measure, "bound": bound,
          "ok": bool(measures[measure] <= bound)}
