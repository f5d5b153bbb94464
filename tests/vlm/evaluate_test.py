"""ECGBench-style VLM evaluation: hard string match, soft P(yes), QA."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from evl_ecg_jax.models import vlm
from evl_ecg_jax.vlm import evaluate as ev
from evl_ecg_jax.vlm import text
from evl_ecg_jax.vlm import tokenizer as tok_lib

CLASSES = ("NORM", "RBBB", "IRBBB", "MI")
DESC = {"NORM": "normal ECG", "RBBB": "right bundle branch block",
        "IRBBB": "incomplete right bundle branch block",
        "MI": "myocardial infarction"}
LABELS = np.asarray([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]],
                    np.float32)  # Every class has positives and negatives.
N, SIZE, NEW = len(LABELS), 64, 6


def _parse(answer):
  """The names of the classes that `answer` mentions."""
  return [c for c, p in zip(CLASSES, ev.parse_classes(answer, CLASSES, DESC))
          if p]


@pytest.mark.parametrize("answer,expected", [
    ("Findings: normal ECG.", ["NORM"]),
    ("Findings: abnormal ECG.", []),  # Not "normal ECG" inside "abnormal".
    ("ABNORMAL rhythm", []),  # Not the class name NORM inside ABNORMAL.
    ("Rhythm is NORM.", ["NORM"]),
    ("norm; mi", ["NORM", "MI"]),  # Case-insensitive names.
    ("Findings: Incomplete Right Bundle Branch Block.", ["IRBBB"]),
    ("incomplete right bundle branch block; right bundle branch block",
     ["RBBB", "IRBBB"]),
    ("Findings: myocardial\n  infarction.", ["MI"]),
    ("Findings: none of the listed classes.", []),
    ("myocardial infarctions, MIs, RBBBs", []),  # Whole words only.
])
def test_parse_classes_hand_written(answer, expected):
  assert _parse(answer) == expected


def test_naive_substring_matching_has_the_pitfall():
  """What parse_classes avoids: plain `in` finds both of these."""
  assert "normal ecg" in "abnormal ecg" and "NORM" in "ABNORMAL"
  assert not ev.parse_classes("abnormal ecg ABNORMAL", CLASSES, DESC).any()


def test_parse_classes_inverts_every_report():
  for bits in itertools.product((0, 1), repeat=len(CLASSES)):
    labels = np.asarray(bits, np.float32)
    report = text.report(labels, CLASSES, DESC)
    np.testing.assert_array_equal(
        ev.parse_classes(report, CLASSES, DESC), labels > 0.5, err_msg=report)


def test_parse_classes_disambiguated_descriptions():
  """Shared descriptions get ' (NAME)', which ends in a non-word char."""
  names = ("A", "B")
  desc = {"A": "sinus rhythm", "B": "sinus rhythm"}
  report = text.report(np.asarray([0., 1.]), names, desc)
  assert report == "Findings: sinus rhythm (B)."
  np.testing.assert_array_equal(ev.parse_classes(report, names, desc),
                                [False, True])


def test_hard_metrics_match_sklearn():
  rng = np.random.default_rng(0)
  labels = rng.random((60, 5)) < 0.4
  pred = rng.random((60, 5)) < 0.5
  names = [f"c{i}" for i in range(5)]
  out = ev.hard_metrics(pred, labels.astype(np.float32), names)
  aucs = [skm.roc_auc_score(labels[:, c], pred[:, c]) for c in range(5)]
  f1s = [skm.f1_score(labels[:, c], pred[:, c]) for c in range(5)]
  for c, name in enumerate(names):
    assert out[f"auc/{name}"] == pytest.approx(aucs[c])
    assert out[f"f1/{name}"] == pytest.approx(f1s[c])
  assert out["macro_auc"] == pytest.approx(np.mean(aucs))
  assert out["macro_f1"] == pytest.approx(
      skm.f1_score(labels, pred, average="macro"))
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
  assert out["hamming_loss"] == pytest.approx(skm.hamming_loss(labels, pred))


def test_sequence_logprob_by_hand():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 6, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 6))
  mask = (rng.random((3, 6)) < 0.6).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = [sum(logp[b, t - 1, targets[b, t]] for t in range(1, 6)
                  if mask[b, t]) for b in range(3)]
  np.testing.assert_allclose(ev.sequence_logprob(logits, targets, mask),
                             expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
  """Tokenizer, tiny student VLM (sharpened), params and images."""
  tok = tok_lib.Tokenizer.train(text.corpus(CLASSES, DESC), "unigram", 384)
  model = vlm.build("tiny_student", vocab_size=tok.vocab_size)
  images = np.random.default_rng(2).uniform(
      size=(N, SIZE, SIZE, 1)).astype(np.float32)
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.PRNGKey(0), images[:1], jnp.ones((1, 4), jnp.int32)))[
          "params"]
  # Larger embeddings: far-from-uniform token distributions, so P(yes)
  # differs between images and classes.
  params["lm"]["embedding"] = params["lm"]["embedding"] * 10.0
  return tok, model, params, images


def _reference_logprob(model, params, images, ids, start):
  """log p(ids[start:] | ids[:start]) [N], full forward, numpy sum."""
  tokens = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (len(images), 1))
  logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(images),
                                   tokens)
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return sum(logp[:, t - 1, ids[t]] for t in range(start, len(ids)))


def test_soft_scores_match_separate_yes_and_no_forwards(setup):
  tok, model, params, images = setup
  scores = ev.soft_scores(model, params, images, tok, CLASSES, DESC,
                          batch_size=N)
  assert scores.shape == (N, len(CLASSES))
  assert ((scores > 0) & (scores < 1)).all()
  assert np.ptp(scores) > 1e-3  # Not a constant 0.5.
  for c in (0, 2):  # The shortest prompt (padded there) and the longest.
    prompt = tok.encode(text.format_prompt(
        text.TEMPLATES["verify"][0].format(DESC[CLASSES[c]])), bos=True)
    yes, no = (_reference_logprob(model, params, images,
                                  prompt + tok.encode(a) + [tok.eos_id],
                                  len(prompt)) for a in (text.YES, text.NO))
    expected = 1.0 / (1.0 + np.exp(no - yes))
    np.testing.assert_allclose(scores[:, c], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      ev.soft_scores(model, params, images, tok, CLASSES, DESC,
                     batch_size=3), scores, rtol=1e-5, atol=1e-6)


def test_left_padded_prompts(setup):
  tok = setup[0]
  texts = ["What findings does this ECG show?", "Does it?"]
  ids, mask = ev.left_padded(tok, texts)
  for row, real, t in zip(ids, mask, texts):
    assert real[-1] and list(row[real]) == tok.encode(t, bos=True)
    assert not real[:np.argmax(real)].any() and real[np.argmax(real):].all()


def test_generate_answers_deterministic_and_padding_free(setup):
  tok, model, params, images = setup
  questions = ["What findings does this ECG show?", "Does it?"] * (N // 2)
  kw = dict(max_new_tokens=NEW, batch_size=N)
  first = ev.generate_answers(model, params, images, tok, questions, **kw)
  assert len(first) == N and all(isinstance(a, str) for a in first)
  assert first == ev.generate_answers(model, params, images, tok, questions,
                                      **kw)
  # The short, left-padded prompt answers as it does unpadded, alone.
  alone = ev.generate_answers(model, params, images[1:2], tok, questions[1],
                              max_new_tokens=NEW, batch_size=1)
  assert alone == first[1:2]


def _qa():
  rng = np.random.default_rng(3)
  return [(i, q.question, q.answer) for i, y in enumerate(LABELS)
          for q in text.qa_pairs(y, CLASSES, DESC, rng, n=1)]


def test_evaluate_keys_and_ranges(setup):
  tok, model, params, images = setup
  out = ev.evaluate(model, params, images, LABELS, tok, CLASSES, DESC,
                    qa=_qa(), max_new_tokens=NEW, batch_size=N)
  keys = ["hard/macro_auc", "hard/macro_f1", "hard/accuracy",
          "soft/macro_auc", "qa/accuracy"] + [
              f"{k}/auc/{c}" for k in ("hard", "soft") for c in CLASSES]
  for key in keys:
    assert 0.0 <= out[key] <= 1.0, (key, out[key])
  assert out["n"] == N


def test_evaluate_with_perfect_answers(setup, monkeypatch):
  """Reports and QA answers from the labels: every hard metric is perfect."""
  tok, model, params, images = setup
  qa = _qa()

  def perfect(model, params, images, tokenizer, question, **kw):
    del model, params, tokenizer, kw
    if isinstance(question, str):
      return [text.report(y, CLASSES, DESC).upper() for y in LABELS]
    assert len(images) == len(qa)
    return [a.upper() + " " for _, _, a in qa]

  monkeypatch.setattr(ev, "generate_answers", perfect)
  out = ev.evaluate(model, params, images, LABELS, tok, CLASSES, DESC,
                    qa=qa, max_new_tokens=NEW, batch_size=N)
  assert out["hard/macro_auc"] == out["hard/macro_f1"] == 1.0
  assert out["hard/accuracy"] == out["qa/accuracy"] == 1.0
  assert out["hard/hamming_loss"] == 0.0
