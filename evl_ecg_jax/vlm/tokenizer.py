"""Tokenizers of the teacher and student VLMs, trained on our own corpus.

Built with the HuggingFace `tokenizers` library at build time, no downloads.
Special tokens have fixed ids in every kind:

  <pad> = 0, <bos> = 1, <eos> = 2, <unk> = 3, <image> = 4

Kinds (no normalizer, so decode(encode(t)) == t for the corpus texts):
  bpe        byte-level BPE (GPT-2 style): ByteLevel pre-tokenizer and
             decoder, all 256 bytes in the vocabulary, so any text
             round-trips. The teacher's, 512 by default.
  unigram    Unigram LM over whole sentences: Metaspace (' ' -> '▁', no
             split, no prefix) pre-tokenizer and decoder; pieces may span
             words. `tokenizers`' UnigramTrainer seeds pieces from distinct
             pre-tokens, so with word splitting the words of a small
             templated corpus are never seeded; whole sentences avoid that.
             Its scores depend on hash-map order, so they are re-estimated
             here by hard EM from uniform scores (deterministic). Printable
             ASCII is in the vocabulary. The student's, 384 by default.
  wordpiece  greedy longest-match WordPiece without '##' (the trainer's
             '##' ids follow hash-map order, hence are not reproducible),
             over Metaspace words, vocabulary learned by the BPE trainer.
Vocabularies may come out smaller than `vocab_size` on a small corpus.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from evl_ecg_jax.vlm import text as text_lib

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)  # Their ids are their positions.
KINDS = ("bpe", "unigram", "wordpiece")
TEACHER = ("bpe", 512)
STUDENT = ("unigram", 384)
ALPHABET = tuple(string.printable[:95])  # Printable ASCII, space included.
EM_ROUNDS = 2
_MODEL_KINDS = {"BPE": "bpe", "Unigram": "unigram", "WordPiece": "wordpiece"}


def _min_vocab(kind: str) -> int:
  """Smallest vocab_size of a kind: specials plus its base alphabet."""
  base = 256 if kind == "bpe" else len(ALPHABET)
  return len(SPECIALS) + base


def _untrained(kind: str, vocab_size: int):
  """An empty backend tokenizer of `kind` and its trainer."""
  common = dict(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                show_progress=False)
  if kind == "bpe":
    backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend, trainers.BpeTrainer(
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
  split = kind == "wordpiece"
  if kind == "unigram":
    backend = tokenizers.Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(unk_token=UNK,
                                      initial_alphabet=list(ALPHABET), **common)
  else:
    backend = tokenizers.Tokenizer(models.WordPiece(
        unk_token=UNK, continuing_subword_prefix=""))
    trainer = trainers.WordPieceTrainer(continuing_subword_prefix="",
                                        initial_alphabet=list(ALPHABET),
                                        **common)
  backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never",
                                                   split=split)
  backend.decoder = decoders.Metaspace(prepend_scheme="never", split=split)
  return backend, trainer


def _with_scores(backend: tokenizers.Tokenizer,
                 scores: dict[str, float]) -> tokenizers.Tokenizer:
  """A copy of a Unigram backend with specials first, then `scores`."""
  data = json.loads(backend.to_str())
  data["model"]["vocab"] = ([[s, 0.0] for s in SPECIALS]
                            + [[p, scores[p]] for p in sorted(scores)])
  data["model"]["unk_id"] = SPECIALS.index(UNK)
  return tokenizers.Tokenizer.from_str(json.dumps(data))


def _rescore(backend: tokenizers.Tokenizer,
             texts: Sequence[str]) -> tokenizers.Tokenizer:
  """Unigram scores by hard EM from uniform ones, on the sorted pieces."""
  vocab = json.loads(backend.to_str())["model"]["vocab"]
  scores = {p: 0.0 for p, _ in vocab if p not in SPECIALS}
  for _ in range(EM_ROUNDS):
    backend = _with_scores(backend, scores)
    counts = dict.fromkeys(scores, 0)
    for encoding in backend.encode_batch(list(texts),
                                         add_special_tokens=False):
      for token in encoding.tokens:
        counts[token] += 1
    total = sum(counts.values()) + 0.5 * len(counts)
    scores = {p: round(math.log((c + 0.5) / total), 6)
              for p, c in counts.items()}
  return _with_scores(backend, scores)


def _check_specials(backend: tokenizers.Tokenizer, where: str) -> None:
  """Raises ValueError unless every special token has its fixed id."""
  ids = [backend.token_to_id(s) for s in SPECIALS]
  if ids != list(range(len(SPECIALS))):
    raise ValueError(f"{where}: special tokens {SPECIALS} have ids {ids}, "
                     f"expected {list(range(len(SPECIALS)))}.")


class Tokenizer:
  """A trained `tokenizers.Tokenizer` with the project's conventions."""

  pad_id, bos_id, eos_id, unk_id, image_id = range(len(SPECIALS))

  def __init__(self, backend: tokenizers.Tokenizer):
    """Wraps `backend` (checks the special tokens' ids)."""
    _check_specials(backend, "tokenizer")
    self.backend = backend

  @classmethod
  def train(cls, texts: Iterable[str], kind: str = TEACHER[0],
            vocab_size: int = TEACHER[1], seed: int = 0) -> Tokenizer:
    """Trains a tokenizer of `kind` on the distinct `texts`.

    The texts are deduplicated, sorted and shuffled with `seed`; the result
    depends only on the set of texts (the trainers count words), so the same
    corpus always gives the same vocabulary and ids.
    """
    if kind not in KINDS:
      raise ValueError(f"kind={kind!r}: expected one of {KINDS}.")
    if vocab_size < _min_vocab(kind):
      raise ValueError(f"vocab_size={vocab_size}: {kind} needs at least "
                       f"{_min_vocab(kind)} (specials + base alphabet).")
    texts = sorted(set(texts))
    if not texts:
      raise ValueError("texts: empty corpus.")
    random.Random(seed).shuffle(texts)
    backend, trainer = _untrained(kind, vocab_size)
    backend.train_from_iterator(texts, trainer)
    if kind == "unigram":
      backend = _rescore(backend, texts)
    backend.add_special_tokens(list(SPECIALS))
    return cls(backend)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Reads a tokenizer saved by `save` (the tokenizers JSON)."""
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: tokenizer file not found.")
    backend = tokenizers.Tokenizer.from_file(path)
    _check_specials(backend, path)
    return cls(backend)

  def save(self, path: str) -> None:
    """Writes the tokenizers JSON to `path` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.backend.save(path + ".tmp", pretty=True)
    os.replace(path + ".tmp", path)

  @property
  def kind(self) -> str:
    """'bpe', 'unigram' or 'wordpiece'."""
    model = json.loads(self.backend.to_str())["model"]["type"]
    return _MODEL_KINDS[model]

  @property
  def vocab_size(self) -> int:
    """Number of ids, specials included (the embedding table's rows)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, bos: bool = False,
             eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with bos / eos around them."""
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first eos, special tokens skipped."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.backend.decode(ids, skip_special_tokens=True)

  def batch_encode(self, texts: Sequence[str], length: int | None = None,
                   bos: bool = False, eos: bool = False) -> np.ndarray:
    """int32 [B, length] ids, right-padded with pad_id.

    `length` defaults to the longest text; a longer text raises ValueError.
    """
    rows = [self.encode(t, bos, eos) for t in texts]
    longest = max((len(r) for r in rows), default=0)
    length = longest if length is None else length
    if longest > length:
      raise ValueError(f"length={length}: a text needs {longest} tokens.")
    out = np.full((len(rows), length), self.pad_id, np.int32)
    for i, row in enumerate(rows):
      out[i, :len(row)] = row
    return out


def encode_example(tokenizer: Tokenizer, example: text_lib.Example,
                   max_len: int, truncate: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
  """ids = bos + prompt + answer + eos (padded) and the answer's loss mask."""
  return text_lib.answer_mask(
      tokenizer.encode(example.prompt, bos=True),
      tokenizer.encode(example.answer), eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, max_len=max_len, truncate=truncate)
