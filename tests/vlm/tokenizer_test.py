"""Teacher and student tokenizers: training, round trips, ids and files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from conftest import REPO
from evl_ecg_jax.data import ptbxl
from evl_ecg_jax.data import synthetic
from evl_ecg_jax.vlm import text
from evl_ecg_jax.vlm import tokenizer as tok_lib

DATA = os.environ.get("EVL_ECG_DATA",
                      os.path.join(REPO, "..", "shared", "data"))
PTBXL = os.path.join(DATA, "ptbxl")
# Capitals, digits and punctuation as in PTB-XL, without needing the data.
EXTRA = {"1AVB": "first degree AV block", "PRC(S)": "premature complex(es)",
         "BIGU": "bigeminal pattern (unknown origin, SV or Ventricular)",
         "LAO/LAE": "left atrial overload/enlargement"}
SENTENCE = "Question: Does this ECG show myocardial infarction? Answer:"


def _corpus() -> list[str]:
  texts = list(text.corpus(synthetic.CLASSES))
  texts += text.corpus(tuple(EXTRA), EXTRA)
  return texts


def _token_offsets(tok, text):
  """(start, end) character span in `text` of each token of encode(text)."""
  encoding = tok.backend.encode(text, add_special_tokens=False)
  return [tuple(span) for span in encoding.offsets]


@pytest.fixture(scope="module")
def corpus():
  return _corpus()


@pytest.fixture(scope="module")
def trained(corpus):
  """{kind: tokenizer} with the default teacher / student sizes."""
  out = {"teacher": tok_lib.Tokenizer.train(corpus, *tok_lib.TEACHER),
         "student": tok_lib.Tokenizer.train(corpus, *tok_lib.STUDENT)}
  out["wordpiece"] = tok_lib.Tokenizer.train(corpus, "wordpiece", 384)
  return out


KINDS = ("teacher", "student", "wordpiece")


@pytest.mark.parametrize("which", KINDS)
def test_round_trip_on_the_whole_corpus(trained, corpus, which):
  tok = trained[which]
  for t in corpus:
    assert tok.decode(tok.encode(t)) == t, t


@pytest.mark.parametrize("kind, size", [("bpe", 512), ("unigram", 384)])
def test_round_trip_on_the_ptbxl_corpus(kind, size):
  if not os.path.exists(os.path.join(PTBXL, ptbxl.STATEMENTS)):
    pytest.skip(f"../shared/data/ptbxl not found: no {ptbxl.STATEMENTS} in "
                f"{os.path.abspath(PTBXL)} (set EVL_ECG_DATA to the folder "
                "holding ptbxl/).")
  descriptions = text.ptbxl_descriptions(PTBXL, ptbxl.class_names(
      ptbxl.read_statements(PTBXL), "all"))
  texts = list(text.corpus(tuple(descriptions), descriptions))
  tok = tok_lib.Tokenizer.train(texts, kind, size)
  assert tok.vocab_size <= size
  bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
  assert not bad


def test_bpe_round_trips_any_text(trained):
  tok = trained["teacher"]
  for t in ("Ünïcode ✓ 12.5 mV\ttab", "  two  spaces ", "QRS>120ms!"):
    assert tok.decode(tok.encode(t)) == t


def test_unigram_round_trips_unseen_ascii(trained):
  tok = trained["student"]
  t = "Zebra QRS 0.12 s [x] @ 99% ~ {ok} | Kq"
  assert tok.decode(tok.encode(t)) == t


@pytest.mark.parametrize("which", KINDS)
def test_special_token_ids_are_fixed(trained, which):
  tok = trained[which]
  assert [tok.backend.token_to_id(s) for s in tok_lib.SPECIALS] == [
      0, 1, 2, 3, 4]
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_id) == (
      0, 1, 2, 3, 4)
  assert tok.encode("<image>") == [4]
  ids = tok.encode("yes", bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("yes")


def test_teacher_and_student_differ(trained):
  teacher, student = trained["teacher"], trained["student"]
  assert (teacher.kind, student.kind) == ("bpe", "unigram")
  assert teacher.vocab_size != student.vocab_size
  assert (_token_offsets(teacher, SENTENCE)
          != _token_offsets(student, SENTENCE))
  assert teacher.vocab_size <= 512 and student.vocab_size <= 384


@pytest.mark.parametrize("which", KINDS)
def test_save_load_gives_identical_encodings(trained, corpus, tmp_path, which):
  tok = trained[which]
  path = str(tmp_path / "sub" / "tokenizer.json")
  tok.save(path)
  with open(path, encoding="utf-8") as f:
    json.load(f)
  loaded = tok_lib.Tokenizer.load(path)
  assert (loaded.kind, loaded.vocab_size) == (tok.kind, tok.vocab_size)
  for t in corpus:
    assert loaded.encode(t) == tok.encode(t)
  assert not os.path.exists(path + ".tmp")


def test_load_checks_file_and_special_ids(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tok_lib.Tokenizer.load(str(tmp_path / "missing.json"))
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  backend.train_from_iterator(["a b c"], tokenizers.trainers.BpeTrainer(
      special_tokens=["<unk>", "<pad>"], show_progress=False))
  path = str(tmp_path / "other.json")
  backend.save(path)
  with pytest.raises(ValueError, match="expected \\[0, 1, 2, 3, 4\\]"):
    tok_lib.Tokenizer.load(path)


def _digest(tok) -> str:
  return hashlib.sha256(tok.backend.to_str().encode()).hexdigest()


@pytest.mark.parametrize("kind, size", [("bpe", 512), ("unigram", 384),
                                        ("wordpiece", 384)])
def test_training_is_deterministic(corpus, kind, size):
  first = tok_lib.Tokenizer.train(corpus, kind, size)
  again = tok_lib.Tokenizer.train(list(reversed(corpus)), kind, size, seed=9)
  assert _digest(first) == _digest(again)


def test_training_is_deterministic_across_processes(corpus):
  """The Rust trainers iterate hash maps seeded per process."""
  code = ("import hashlib, sys; sys.path.insert(0, 'tests/vlm'); "
          "import tokenizer_test as t; "
          "from evl_ecg_jax.vlm import tokenizer as k; "
          "print(*[t._digest(k.Tokenizer.train(t._corpus(), kind, size)) "
          "for kind, size in (('bpe', 512), ('unigram', 384), "
          "('wordpiece', 384))])")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, "tests"]))
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True).stdout
  here = [_digest(tok_lib.Tokenizer.train(corpus, kind, size))
          for kind, size in (("bpe", 512), ("unigram", 384),
                             ("wordpiece", 384))]
  assert out.split() == here


def test_decode_stops_at_eos_and_skips_specials(trained):
  tok = trained["student"]
  ids = [tok.bos_id, tok.image_id] + tok.encode("Findings: normal ECG.")
  assert tok.decode(ids + [tok.eos_id] + tok.encode("no")) == (
      "Findings: normal ECG.")
  assert tok.decode(np.asarray(ids + [tok.pad_id] * 3)) == (
      "Findings: normal ECG.")


def test_batch_encode_pads_and_checks_length(trained):
  tok = trained["teacher"]
  out = tok.batch_encode(["yes", "Findings: normal ECG."], bos=True, eos=True)
  long = tok.encode("Findings: normal ECG.", bos=True, eos=True)
  assert out.shape == (2, len(long)) and out.dtype == np.int32
  np.testing.assert_array_equal(out[1], long)
  short = tok.encode("yes", bos=True, eos=True)
  np.testing.assert_array_equal(out[0, :len(short)], short)
  assert (out[0, len(short):] == tok.pad_id).all()
  assert tok.batch_encode(["yes"], length=8).shape == (1, 8)
  with pytest.raises(ValueError, match="length=2"):
    tok.batch_encode(["Findings: normal ECG."], length=2)


@pytest.mark.parametrize("which", KINDS)
def test_token_offsets_cover_the_text(trained, corpus, which):
  tok = trained[which]
  for t in corpus[::7]:
    spans = _token_offsets(tok, t)
    assert len(spans) == len(tok.encode(t))
    assert "".join(t[a:b] for a, b in spans) == t
    assert all(a < b for a, b in spans)


def test_encode_example_masks_the_answer(trained):
  tok = trained["student"]
  example = text.examples(np.asarray([0, 1, 1, 0, 0]), synthetic.CLASSES,
                          None, np.random.default_rng(0), n=1,
                          kinds=("query",))[0]
  ids, mask = tok_lib.encode_example(tok, example, max_len=96)
  answer = tok.encode(example.answer)
  assert ids[0] == tok.bos_id and mask.sum() == len(answer) + 1
  assert tok.decode(ids[mask == 1]) == example.answer
  assert tok.decode(ids[mask == 0]) == example.prompt
  with pytest.raises(ValueError, match="max_len=10"):
    tok_lib.encode_example(tok, example, max_len=10)


def test_train_rejects_bad_arguments(corpus):
  with pytest.raises(ValueError, match="kind='sentencepiece'"):
    tok_lib.Tokenizer.train(corpus, "sentencepiece", 384)
  with pytest.raises(ValueError, match="vocab_size=100: bpe needs at least"):
    tok_lib.Tokenizer.train(corpus, "bpe", 100)
  with pytest.raises(ValueError, match="empty"):
    tok_lib.Tokenizer.train([], "bpe", 512)
