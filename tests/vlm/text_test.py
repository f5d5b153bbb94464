"""Text targets: descriptions, reports, QA pairs, loss masks and the corpus."""

from __future__ import annotations

import csv
import os
import re

import numpy as np
import pytest

from conftest import REPO
from evl_ecg_jax.data import ptbxl
from evl_ecg_jax.data import synthetic
from evl_ecg_jax.vlm import text

DATA = os.environ.get("EVL_ECG_DATA",
                      os.path.join(REPO, "..", "shared", "data"))
PTBXL = os.path.join(DATA, "ptbxl")
CLASSES = synthetic.CLASSES  # NORM, MI, STTC, CD, HYP.


def _ptbxl_root() -> str:
  """The real PTB-XL subset, or skip saying where it was looked for."""
  if not os.path.exists(os.path.join(PTBXL, ptbxl.STATEMENTS)):
    pytest.skip(f"../shared/data/ptbxl not found: no {ptbxl.STATEMENTS} in "
                f"{os.path.abspath(PTBXL)} (set EVL_ECG_DATA to the folder "
                "holding ptbxl/).")
  return PTBXL


def _labels(*present: str, names=CLASSES) -> np.ndarray:
  return np.asarray([n in present for n in names], np.float32)


def _match(templates, question):
  """The {} argument of the template that `question` instantiates."""
  for template in templates:
    pattern = re.escape(template).replace(r"\{\}", "(.+)")
    found = re.fullmatch(pattern, question)
    if found:
      return found.groups()[0] if found.groups() else ""
  raise AssertionError(f"{question!r} matches no template of {templates}.")


def _options(joined: str) -> list[str]:
  """Inverse of text.join_options."""
  if "; or " in joined:
    head, last = joined.rsplit("; or ", 1)
    return head.split("; ") + [last]
  if " or " in joined:
    head, last = joined.rsplit(" or ", 1)
    return head.split(", ") + [last]
  return [joined]


def _check_qa(qa, labels, names, descriptions):
  """Asserts that a QA pair's answer is right for `labels`."""
  desc = [descriptions[n] for n in names]
  present = {d for d, y in zip(desc, labels) if y > 0.5}
  if qa.kind == "verify":
    asked = _match(text.TEMPLATES["verify"], qa.question)
    assert asked in desc
    assert qa.answer == ("yes" if asked in present else "no")
  elif qa.kind == "choose":
    options = _options(_match(text.TEMPLATES["choose"], qa.question))
    assert set(options) <= set(desc) and len(set(options)) == len(options)
    assert 1 <= len(options) <= text.MAX_OPTIONS
    expected = [o for o in options if o in present]
    assert qa.answer == ("; ".join(expected) if expected else "none")
  else:
    assert qa.kind == "query"
    _match(text.TEMPLATES["query"], qa.question)
    assert qa.answer == text.report(labels, names, descriptions)


def test_superclasses_have_fixed_readable_names():
  assert text.describe_classes(CLASSES) == {
      "NORM": "normal ECG", "MI": "myocardial infarction",
      "STTC": "ST/T change", "CD": "conduction disturbance",
      "HYP": "hypertrophy"}


def test_unknown_names_fall_back_and_overrides_win():
  got = text.describe_classes(("AFIB", "left_bundle__block", "X"),
                              descriptions={"X": "  custom   thing "})
  assert got == {"AFIB": "afib", "left_bundle__block": "left bundle block",
                 "X": "custom thing"}


def test_shared_descriptions_are_disambiguated():
  got = text.describe_classes(("A", "B"), descriptions={"A": "same",
                                                         "B": "same"})
  assert got == {"A": "same (A)", "B": "same (B)"}


@pytest.mark.parametrize("present, expected", [
    (("MI", "STTC"), "Findings: myocardial infarction; ST/T change."),
    (("STTC", "MI"), "Findings: myocardial infarction; ST/T change."),
    (("NORM",), "Findings: normal ECG."),
    ((), "Findings: none of the listed classes."),
    (("HYP", "NORM", "CD"),
     "Findings: normal ECG; conduction disturbance; hypertrophy."),
])
def test_report_lists_present_classes_in_class_order(present, expected):
  assert text.report(_labels(*present), CLASSES) == expected


def test_report_uses_given_descriptions_and_checks_shape():
  assert text.report([1, 0], ("a_b", "C"), {"a_b": "thing one"}) == (
      "Findings: thing one.")
  assert text.report([0.2, 0.9], ("a_b", "C")) == "Findings: c."
  with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
    text.report([1, 0, 0], ("A", "B"))


def test_qa_answers_agree_with_labels():
  rng = np.random.default_rng(0)
  descriptions = text.describe_classes(CLASSES)
  kinds = set()
  for _ in range(60):
    labels = (rng.random(len(CLASSES)) < 0.4).astype(np.float32)
    for qa in text.qa_pairs(labels, CLASSES, None, rng, n=10):
      _check_qa(qa, labels, CLASSES, descriptions)
      kinds.add(qa.kind)
  assert kinds == set(text.KINDS)


def test_verify_asks_about_present_and_absent_classes():
  rng = np.random.default_rng(1)
  answers = [qa.answer for qa in text.qa_pairs(
      _labels("MI"), CLASSES, None, rng, n=400, kinds=("verify",))]
  assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_choose_answers_none_when_no_option_is_present():
  rng = np.random.default_rng(2)
  answers = {qa.answer for qa in text.qa_pairs(
      _labels(), CLASSES, None, rng, n=50, kinds=("choose",))}
  assert answers == {"none"}


def test_qa_pairs_are_seeded():
  labels = _labels("MI", "CD")

  def draw(seed):
    return text.examples(labels, CLASSES, None, np.random.default_rng(seed),
                         n=20)

  assert draw(3) == draw(3)
  assert draw(3) != draw(4)


def test_examples_wrap_questions_in_the_prompt_template():
  rng = np.random.default_rng(5)
  qas = text.qa_pairs(_labels("HYP"), CLASSES, None, rng, n=8)
  got = text.examples(_labels("HYP"), CLASSES, None,
                      np.random.default_rng(5), n=8)
  assert got == [text.Example(text.format_prompt(q), a, k) for q, a, k in qas]
  assert all(e.prompt.endswith("Answer:") for e in got)


def test_qa_pairs_reject_bad_kinds_and_empty_classes():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="kinds"):
    text.qa_pairs(_labels(), CLASSES, None, rng, kinds=("caption",))
  with pytest.raises(ValueError, match="empty"):
    text.qa_pairs([], (), None, rng)


def test_answer_mask_is_one_exactly_on_answer_and_eos():
  ids, mask = text.answer_mask([1, 7, 8, 9], [20, 21], eos_id=2, pad_id=0,
                               max_len=10)
  np.testing.assert_array_equal(ids, [1, 7, 8, 9, 20, 21, 2, 0, 0, 0])
  np.testing.assert_array_equal(mask, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
  assert ids.dtype == np.int32 and mask.dtype == np.float32


def test_answer_mask_exact_fit_and_empty_answer():
  ids, mask = text.answer_mask([5], [6], eos_id=2, pad_id=0, max_len=3)
  np.testing.assert_array_equal(ids, [5, 6, 2])
  np.testing.assert_array_equal(mask, [0, 1, 1])
  ids, mask = text.answer_mask([5], [], eos_id=2, pad_id=0, max_len=3)
  np.testing.assert_array_equal(mask, [0, 1, 0])


def test_answer_mask_too_long_raises_with_both_lengths():
  with pytest.raises(ValueError, match=r"max_len=5.* need 7 tokens"):
    text.answer_mask([1, 2, 3, 4], [5, 6], eos_id=9, pad_id=0, max_len=5)


def test_answer_mask_truncation_keeps_some_answer():
  ids, mask = text.answer_mask([1, 2, 3], [5, 6, 7], eos_id=9, pad_id=0,
                               max_len=5, truncate=True)
  np.testing.assert_array_equal(ids, [1, 2, 3, 5, 6])
  np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"max_len=3.* need 5 tokens.*no room"):
    text.answer_mask([1, 2, 3], [5], eos_id=9, pad_id=0, max_len=3,
                     truncate=True)


def test_corpus_holds_every_template_description_and_answer():
  texts = list(text.corpus(CLASSES))
  assert texts == list(text.corpus(CLASSES))
  corpus = set(texts)
  descriptions = text.describe_classes(CLASSES)
  assert set(descriptions.values()) <= corpus
  assert {"yes", "no", "none", text.report(_labels(), CLASSES)} <= corpus
  for name, description in descriptions.items():
    assert text.report(_labels(name), CLASSES) in corpus
    for template in text.TEMPLATES["verify"]:
      assert text.format_prompt(template.format(description)) in corpus
  for template in text.TEMPLATES["query"]:
    assert text.format_prompt(template) in corpus


def test_join_options_stays_parseable_with_commas():
  assert text.join_options(["a", "b", "c"]) == "a, b or c"
  assert text.join_options(["a, x", "b"]) == "a, x; or b"
  assert _options(text.join_options(["a or x", "b", "c"])) == [
      "a or x", "b", "c"]


def _csv_descriptions(root):
  with open(os.path.join(root, ptbxl.STATEMENTS), newline="",
            encoding="utf-8") as f:
    return {row[""]: row["description"] for row in csv.DictReader(f)}


def _label_set(root, label_set):
  return text.ptbxl_descriptions(root, ptbxl.class_names(
      ptbxl.read_statements(root), label_set))


def test_ptbxl_descriptions_come_from_scp_statements():
  root = _ptbxl_root()
  csv_desc = _csv_descriptions(root)
  got = _label_set(root, "superdiagnostic")
  assert got == text.describe_classes(ptbxl.SUPERCLASSES)
  diagnostic = _label_set(root, "diagnostic")
  assert diagnostic["IMI"] == "inferior myocardial infarction"
  for code, description in diagnostic.items():
    if code not in text.SUPERCLASS_DESCRIPTIONS:
      assert description == " ".join(csv_desc[code].split())
  sub = _label_set(root, "subdiagnostic")
  assert sub["LAFB/LPFB"] == ("left anterior fascicular block or left "
                              "posterior fascicular block")


@pytest.mark.parametrize("label_set", ptbxl.LABEL_SETS)
def test_ptbxl_label_sets_give_distinct_descriptions_and_right_qa(label_set):
  root = _ptbxl_root()
  descriptions = _label_set(root, label_set)
  names = tuple(descriptions)
  assert all(descriptions.values())
  assert len(set(descriptions.values())) == len(names)
  rng = np.random.default_rng(7)
  for _ in range(10):
    labels = (rng.random(len(names)) < 0.1).astype(np.float32)
    for qa in text.qa_pairs(labels, names, descriptions, rng, n=10):
      _check_qa(qa, labels, names, descriptions)
