"""Prediction over a split and its metrics."""

from __future__ import annotations

import numpy as np

from evl_ecg_jax.data import pipeline
from evl_ecg_jax.eval import metrics as metrics_lib


def predict_split(predict, params, data_cfg, split: str):
  """Runs `predict` over every example of `split` -> (probs, labels, ids).

  `predict(params, {"ecg": [B, T, L]}) -> probs [B, C]` (host arrays) is a
  runner's predictor (train/runner.py); every process predicts the whole
  split, so each holds every prediction.
  """
  probs, labels, ids = [], [], []
  for batch in pipeline.eval_batches(data_cfg, split):
    out = np.asarray(predict(params, {"ecg": batch["ecg"]}))
    keep = batch["mask"]
    probs.append(out[keep])
    labels.append(batch["labels"][keep])
    ids.append(batch["id"][keep])
  return np.concatenate(probs), np.concatenate(labels), np.concatenate(ids)


def evaluate(predict, params, data_cfg, splits,
             predictions: dict | None = None) -> dict:
  """{"<split>/macro_auc", "<split>/auc/<class>", "<split>/n"} per split.

  With a "validation" split, per-class F1-optimal thresholds are chosen on
  it and applied to every split ("<split>/macro_f1", "<split>/f1/<class>",
  and "thresholds"). `predictions`, if given, receives {split: (probs,
  labels, ids)}.
  """
  out, preds = {}, {}
  for split in splits:
    preds[split] = predict_split(predict, params, data_cfg, split)
  names = data_cfg.class_names
  thresholds = None
  if "validation" in preds:
    probs, labels, _ = preds["validation"]
    thresholds = [metrics_lib.best_threshold(labels[:, c], probs[:, c])
                  for c in range(len(names))]
    out["thresholds"] = dict(zip(names, thresholds))
  for split, (probs, labels, _) in preds.items():
    split_metrics = metrics_lib.multilabel_auc(labels, probs, names)
    if thresholds is not None:
      split_metrics.update(metrics_lib.multilabel_f1(labels, probs,
                                                     thresholds, names))
    split_metrics["n"] = len(labels)
    out.update({f"{split}/{k}": v for k, v in split_metrics.items()})
  if predictions is not None:
    predictions.update(preds)
  return out
