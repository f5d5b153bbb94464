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


@pytest.mark.parametrize("seed", range(3))
def test_f1_and_threshold_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(200) < 0.3
  scores = np.round(rng.random(200) * 0.6 + 0.4 * labels, 2)
  t = metrics.best_threshold(labels, scores)
  assert metrics.f1_score(labels, scores >= t) == pytest.approx(
      skm.f1_score(labels, scores >= t), abs=1e-12)
  # No other threshold does better (sklearn's precision-recall curve).
  prec, rec, _ = skm.precision_recall_curve(labels, scores)
  f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12),
                0)
  assert metrics.f1_score(labels, scores >= t) == pytest.approx(f1.max())


def test_multilabel_f1_hand_case():
  labels = np.asarray([[1, 0], [1, 1], [0, 1], [0, 0]])
  scores = np.asarray([[0.9, 0.2], [0.4, 0.7], [0.6, 0.3], [0.1, 0.1]])
  out = metrics.multilabel_f1(labels, scores, [0.5, 0.3], ("A", "B"))
  # A: predicted {0, 2}, TP 1, FP 1, FN 1 -> 0.5; B: {1, 2} both right -> 1.
  assert out == {"macro_f1": 0.75, "f1/A": 0.5, "f1/B": 1.0}
  assert metrics.f1_score([0, 0], [False, False]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_curve_matches_sklearn_points_and_area(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(200) < 0.3
  scores = np.round(rng.random(200), 1)  # many ties
  fpr, tpr = metrics.roc_curve(labels, scores)
  ref_fpr, ref_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr)
  np.testing.assert_allclose(tpr, ref_tpr)
  assert np.trapezoid(tpr, fpr) == pytest.approx(
      metrics.roc_auc(labels, scores), abs=1e-12)
