"""Prediction over a split and its metrics."""

from __future__ import annotations

import numpy as np

from evl_ecg_jax import parallel
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.eval import metrics as metrics_lib


def predict_split(p_predict, params, data_cfg, split: str, num_devices: int):
  """Runs `p_predict` over every example of `split` -> (probs, labels, ids)."""
  probs, labels, ids = [], [], []
  for batch in pipeline.eval_batches(data_cfg, split):
    out = parallel.merge_outputs(p_predict(
        params, parallel.split_batch({"ecg": batch["ecg"]}, num_devices)))
    keep = batch["mask"]
    probs.append(out[keep])
    labels.append(batch["labels"][keep])
    ids.append(batch["id"][keep])
  return np.concatenate(probs), np.concatenate(labels), np.concatenate(ids)


def evaluate(p_predict, params, data_cfg, splits, num_devices: int) -> dict:
  """{"<split>/macro_auc": ..., "<split>/auc/<class>": ..., "<split>/n": ...}."""
  out = {}
  for split in splits:
    probs, labels, _ = predict_split(p_predict, params, data_cfg, split,
                                     num_devices)
    split_metrics = metrics_lib.multilabel_auc(labels, probs,
                                               data_cfg.class_names)
    split_metrics["n"] = len(labels)
    out.update({f"{split}/{k}": v for k, v in split_metrics.items()})
  return out
