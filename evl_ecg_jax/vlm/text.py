"""Text targets of the ECG VLM: class descriptions, reports and QA pairs.

Everything is built from a list of class names (PTB-XL label sets, the
synthetic dataset's CLASSES, anything else) and an optional
{class name: description} map; PTB-XL descriptions come from
scp_statements.csv through `describe_classes`.

  report   "Findings: myocardial infarction; ST/T change." (class order)
  verify   "Does this ECG show myocardial infarction?" -> "yes" / "no"
  choose   "Which of these does this ECG show: A, B or C?" -> "A; C" / "none"
  query    "What findings does this ECG show?" -> the report

Prompt and answer are tokenized separately; `answer_mask` lays out
prompt + answer + eos with a loss mask that is 1 on the answer and eos only.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from evl_ecg_jax.data import ptbxl

SUPERCLASS_DESCRIPTIONS = {  # Fixed names of ptbxl.SUPERCLASSES.
    "NORM": "normal ECG", "MI": "myocardial infarction", "STTC": "ST/T change",
    "CD": "conduction disturbance", "HYP": "hypertrophy"}
KINDS = ("verify", "choose", "query")
TEMPLATES = {
    "verify": ("Does this ECG show {}?",
               "Is there evidence of {} in this ECG?"),
    "choose": ("Which of these does this ECG show: {}?",),
    "query": ("What findings does this ECG show?",
              "Describe the findings of this ECG."),
}
YES, NO, NONE = "yes", "no", "none"
FINDINGS = "Findings: {}."
NO_FINDINGS = "none of the listed classes"
SEPARATOR = "; "  # Between findings of a report and present options.
MAX_OPTIONS = 4


@dataclasses.dataclass(frozen=True)
class Example:
  """One training example: the loss is computed on `answer` only."""
  prompt: str
  answer: str
  kind: str


class QA(NamedTuple):
  """A question, its answer and its kind (one of KINDS)."""
  question: str
  answer: str
  kind: str


def readable(name: str) -> str:
  """Fallback description of a class: 'LAO/LAE_' -> 'lao/lae'."""
  text = " ".join(name.replace("_", " ").split()).lower()
  return text or name


def _statement_description(name: str,
                           statements: Mapping[str, dict]) -> str | None:
  """Description of a PTB-XL code, else of the codes of a subclass."""
  if name in statements:
    return statements[name]["description"].strip() or None
  parts = [row["description"].strip() for row in statements.values()
           if row.get("diagnostic_subclass", "").strip() == name]
  parts = list(dict.fromkeys(p for p in parts if p))
  return " or ".join(parts) or None


def _disambiguate(descriptions: dict[str, str]) -> dict[str, str]:
  """Appends ' (NAME)' to descriptions that two classes share."""
  counts = collections.Counter(descriptions.values())
  return {name: text if counts[text] == 1 else f"{text} ({name})"
          for name, text in descriptions.items()}


def describe_classes(class_names: Sequence[str],
                     statements: Mapping[str, dict] | None = None,
                     descriptions: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
  """{class name: human-readable description}, in class order.

  First match wins: `descriptions` (explicit overrides), the fixed names of
  the PTB-XL superclasses, the scp_statements `description` of the code (or
  the descriptions of a subclass's codes, joined by ' or '), then the name
  lower-cased and de-underscored. Shared descriptions get ' (NAME)'.
  `statements` is `ptbxl.read_statements(root)` or None.
  """
  descriptions = descriptions or {}
  statements = statements or {}
  out = {}
  for name in class_names:
    text = (descriptions.get(name) or SUPERCLASS_DESCRIPTIONS.get(name)
            or _statement_description(name, statements) or readable(name))
    out[name] = " ".join(text.split())
  return _disambiguate(out)


def ptbxl_descriptions(root: str, class_names: Sequence[str]
                       ) -> dict[str, str]:
  """describe_classes of PTB-XL classes, with `root`'s scp_statements.csv."""
  return describe_classes(class_names, ptbxl.read_statements(root))


def _present(labels, class_names: Sequence[str]) -> np.ndarray:
  """Boolean [C] of the classes whose label is > 0.5."""
  labels = np.asarray(labels, np.float32)
  if labels.shape != (len(class_names),):
    raise ValueError(f"labels of shape {labels.shape}: expected "
                     f"({len(class_names)},), one per class {class_names}.")
  return labels > 0.5


def _resolve(class_names: Sequence[str],
             descriptions: Mapping[str, str] | None) -> list[str]:
  """Descriptions in class order (missing ones from `describe_classes`)."""
  full = describe_classes(class_names, descriptions=descriptions)
  return [full[name] for name in class_names]


def findings(texts: Sequence[str]) -> str:
  """'Findings: a; b.' or 'Findings: none of the listed classes.'."""
  return FINDINGS.format(SEPARATOR.join(texts) or NO_FINDINGS)


def report(labels, class_names: Sequence[str],
           descriptions: Mapping[str, str] | None = None) -> str:
  """Report of the present classes, in class order."""
  present = _present(labels, class_names)
  texts = _resolve(class_names, descriptions)
  return findings([t for t, p in zip(texts, present) if p])


def join_options(options: Sequence[str]) -> str:
  """'a, b or c'; with '; ' (and '; or ') if an option has ',' or ' or '."""
  if len(options) < 2:
    return "".join(options)
  if any("," in o or " or " in o for o in options):
    return "; ".join(options[:-1]) + "; or " + options[-1]
  return ", ".join(options[:-1]) + " or " + options[-1]


def _template(kind: str, rng: np.random.Generator) -> str:
  """One of the templates of `kind`, drawn with `rng`."""
  templates = TEMPLATES[kind]
  return templates[int(rng.integers(len(templates)))]


def verify(present: np.ndarray, texts: Sequence[str],
           rng: np.random.Generator) -> QA:
  """Yes/no question on one class; present and absent classes equally."""
  pos, neg = np.flatnonzero(present), np.flatnonzero(~present)
  pool = (pos if rng.random() < 0.5 else neg) if len(pos) and len(neg) else (
      np.arange(len(texts)))
  i = int(pool[rng.integers(len(pool))])
  question = _template("verify", rng).format(texts[i])
  return QA(question, YES if present[i] else NO, "verify")


def choose(present: np.ndarray, texts: Sequence[str],
           rng: np.random.Generator) -> QA:
  """Multiple choice among 2-4 classes; answer: present ones or 'none'."""
  low = min(2, len(texts))
  k = int(rng.integers(low, min(MAX_OPTIONS, len(texts)) + 1))
  idx = [int(i) for i in rng.choice(len(texts), size=k, replace=False)]
  question = _template("choose", rng).format(join_options(
      [texts[i] for i in idx]))
  answer = SEPARATOR.join(texts[i] for i in idx if present[i]) or NONE
  return QA(question, answer, "choose")


def query(present: np.ndarray, texts: Sequence[str],
          rng: np.random.Generator) -> QA:
  """Open question; the answer is the report."""
  return QA(_template("query", rng),
            findings([t for t, p in zip(texts, present) if p]), "query")


_MAKERS = {"verify": verify, "choose": choose, "query": query}


def qa_pairs(labels, class_names: Sequence[str],
             descriptions: Mapping[str, str] | None,
             rng: np.random.Generator, n: int = 1,
             kinds: Sequence[str] = KINDS) -> list[QA]:
  """`n` question/answer pairs of kinds drawn uniformly from `kinds`."""
  if not kinds or any(k not in _MAKERS for k in kinds):
    raise ValueError(f"kinds={kinds!r}: expected a non-empty subset of "
                     f"{KINDS}.")
  if not class_names:
    raise ValueError("class_names: empty, nothing to ask about.")
  present = _present(labels, class_names)
  texts = _resolve(class_names, descriptions)
  return [_MAKERS[kinds[int(rng.integers(len(kinds)))]](present, texts, rng)
          for _ in range(n)]


def format_prompt(question: str) -> str:
  """The prompt text around a question; the answer follows it."""
  return f"Question: {question} Answer:"


def examples(labels, class_names: Sequence[str],
             descriptions: Mapping[str, str] | None,
             rng: np.random.Generator, n: int = 1,
             kinds: Sequence[str] = KINDS) -> list[Example]:
  """`n` training examples (prompt, answer, kind) of one label vector."""
  return [Example(format_prompt(q), a, k) for q, a, k in qa_pairs(
      labels, class_names, descriptions, rng, n, kinds)]


def answer_mask(prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                eos_id: int, pad_id: int, max_len: int,
                truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Token ids prompt + answer + eos, padded, and the answer's loss mask.

  Returns int32 ids [max_len] and a float32 mask [max_len] that is 1 on the
  answer tokens and eos, 0 on the prompt (bos / image tokens included) and
  padding; for next-token loss weight (logits[:-1], ids[1:]) by mask[1:].
  A sequence longer than max_len raises ValueError naming both lengths,
  unless `truncate`: then it loses its tail (eos, then the answer's end) but
  keeps at least one answer token, and raises if the prompt fills max_len.
  """
  prompt, answer = list(prompt_ids), list(answer_ids) + [eos_id]
  need = len(prompt) + len(answer)
  if need > max_len and (not truncate or len(prompt) >= max_len):
    what = "the prompt leaves no room for the answer" if truncate else (
        "pass truncate=True to cut the answer's tail")
    raise ValueError(f"max_len={max_len} but prompt + answer + eos need "
                     f"{need} tokens (prompt {len(prompt)}, answer + eos "
                     f"{len(answer)}): {what}.")
  ids = (prompt + answer)[:max_len]
  mask = ([0.] * len(prompt) + [1.] * len(answer))[:max_len]
  pad = max_len - len(ids)
  return (np.asarray(ids + [pad_id] * pad, np.int32),
          np.asarray(mask + [0.] * pad, np.float32))


def _windows(texts: Sequence[str]) -> Iterator[list[str]]:
  """Cyclic windows of 2..MAX_OPTIONS consecutive texts."""
  for k in range(min(2, len(texts)), min(MAX_OPTIONS, len(texts)) + 1):
    for start in range(len(texts)):
      yield [texts[(start + j) % len(texts)] for j in range(k)]


def corpus(class_names: Sequence[str],
           descriptions: Mapping[str, str] | None = None) -> Iterator[str]:
  """Every kind of text the VLM sees, to train tokenizers on.

  Descriptions, reports (none, each class, consecutive pairs, all), prompts
  of all templates, and the short answers.
  """
  texts = _resolve(class_names, descriptions)
  yield from texts
  pairs = [texts[i:i + 2] for i in range(len(texts) - 1)]
  for group in itertools.chain([[]], ([t] for t in texts), pairs, [texts]):
    yield findings(group)
    yield SEPARATOR.join(group) or NONE
  questions = itertools.chain(
      (t.format(d) for t in TEMPLATES["verify"] for d in texts),
      (t.format(join_options(w)) for t in TEMPLATES["choose"]
       for w in _windows(texts)), TEMPLATES["query"])
  for question in questions:
    yield question
    yield format_prompt(question)
  yield from (YES, NO, NONE)
