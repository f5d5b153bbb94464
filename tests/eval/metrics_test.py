"""roc_auc / multilabel_auc against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from evl_ecg_jax.eval import metrics


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(300) < 0.3
  scores = np.round(rng.normal(size=300) + labels, 1)  # rounding -> ties
  assert metrics.roc_auc(labels, scores) == pytest.approx(
      skm.roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_hand_case():
  # pos scores {0.8, 0.4}, neg {0.5, 0.1}: pairs won 1+1+0+1 of 4 -> 0.75.
  assert metrics.roc_auc([1, 0, 1, 0], [0.8, 0.5, 0.4, 0.1]) == 0.75
  assert metrics.roc_auc([1, 0], [0.3, 0.3]) == 0.5  # tie counts half


def test_single_class_is_nan_and_left_out_of_macro():
  labels = np.array([[1, 0], [1, 1], [1, 0], [1, 1]])
  scores = np.array([[0.1, 0.2], [0.2, 0.9], [0.3, 0.1], [0.4, 0.8]])
  out = metrics.multilabel_auc(labels, scores, ["A", "B"])
  assert np.isnan(out["auc/A"])
  assert out["auc/B"] == 1.0
  assert out["macro_auc"] == 1.0


def test_macro_auc_matches_sklearn():
  rng = np.random.default_rng(0)
  labels = (rng.random((200, 5)) < 0.3).astype(int)
  scores = rng.normal(size=(200, 5)) + labels
  out = metrics.multilabel_auc(labels, scores, list("abcde"))
  assert out["macro_auc"] == pytest.approx(
      skm.roc_auc_score(labels, scores, average="macro"), abs=1e-12)
