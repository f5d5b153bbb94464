"""ECGBench-style evaluation of an ECG VLM on images with multi-hot labels.

  hard   the answer to the query question ("What findings does this ECG
         show?") is string-matched against the class descriptions and names
         (`parse_classes`); AUC and F1 of these 0/1 predictions, as ECGBench.
  soft   per class, P("yes") of the verify question: a softmax over the
         teacher-forced log-likelihoods of "yes" + eos and "no" + eos
         (`soft_scores`); a real ROC-AUC.
  qa     exact match of generated answers to (image, question, answer).

The pitfall of naive hard matching: substring search finds "NORM" in
"ABNORMAL" and "normal ECG" in "abnormal ECG", so every abnormal report also
predicts the normal class. Here phrases match case-insensitively on word
boundaries, longest first, and a span taken by a longer phrase is not
matched again by a shorter one ("right bundle branch block" inside
"incomplete right bundle branch block"); "none of the listed classes"
claims its span and predicts nothing. Negations ("no infarction") still
count as mentions, as in ECGBench.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evl_ecg_jax.eval import metrics as metrics_lib
from evl_ecg_jax.models import vlm as vlm_lib
from evl_ecg_jax.vlm import text as text_lib
from evl_ecg_jax.vlm import tokenizer as tok_lib


def _pattern(phrase: str) -> re.Pattern:
  """`phrase` on word boundaries, any whitespace run between its words.

  Boundaries are lookarounds (no word character just before / after), which
  equal `\\b` at word-character edges and also hold at ')' or '/' edges.
  """
  words = r"\s+".join(re.escape(w) for w in phrase.split())
  return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def _phrases(class_names: Sequence[str],
             descriptions: Mapping[str, str] | None
             ) -> list[tuple[re.Pattern, int]]:
  """(pattern, class index) of descriptions and names, longest first.

  The no-findings phrase has class index -1 (it claims its span only).
  """
  texts = text_lib.describe_classes(class_names, descriptions=descriptions)
  pairs = [(text_lib.NO_FINDINGS, -1)] + [
      (p, c) for c, name in enumerate(class_names)
      for p in dict.fromkeys((texts[name], name))]
  pairs.sort(key=lambda pc: (-len(pc[0]), pc[1]))
  return [(_pattern(p), c) for p, c in pairs]


def parse_classes(answer: str, class_names: Sequence[str],
                  descriptions: Mapping[str, str] | None = None
                  ) -> np.ndarray:
  """Bool [C]: the classes whose description or name the answer mentions.

  ECGBench's hard string match without its substring pitfall (see the
  module docstring): phrases are tried longest first and a match must not
  overlap a span already taken by a longer phrase.
  """
  found = np.zeros(len(class_names), bool)
  taken = np.zeros(len(answer) + 1, bool)
  for pattern, c in _phrases(class_names, descriptions):
    for match in pattern.finditer(answer):
      start, end = match.span()
      if not taken[start:end].any():
        taken[start:end] = True
        if c >= 0:  # -1: the no-findings phrase.
          found[c] = True
  return found


def hard_metrics(pred, labels, class_names: Sequence[str] | None = None
                 ) -> dict:
  """Metrics of 0/1 predictions [N, C] against multi-hot labels [N, C].

  Returns {"macro_auc", "auc/<class>"} (AUC of the binary predictions, as
  ECGBench; NaN classes out of the macro mean), {"macro_f1", "f1/<class>"},
  "accuracy" = exact match (every class of a sample right) and
  "hamming_loss" = the fraction of wrong (sample, class) entries.
  """
  pred, labels = np.asarray(pred, bool), np.asarray(labels) > 0.5
  names = [str(c) for c in range(pred.shape[1])] if class_names is None else (
      list(class_names))
  scores = pred.astype(np.float32)
  return {**metrics_lib.multilabel_auc(labels, scores, names),
          **metrics_lib.multilabel_f1(labels, scores, [0.5] * len(names),
                                      names),
          "accuracy": float(np.mean(np.all(pred == labels, axis=1))),
          "hamming_loss": float(np.mean(pred != labels))}


def sequence_logprob(logits, targets, mask):
  """Sum over t of log p(targets[:, t]) where mask[:, t] is 1 -> [B].

  logits [B, L, V] are the model's outputs on `targets` [B, L] themselves:
  logits at position t predict token t + 1, so targets and mask are shifted
  by one here (mask[:, 0] is ignored: the first token is never predicted;
  the last logits are unused). `text.answer_mask` gives such a mask.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float32)[:, :-1], jnp.asarray(targets)[:, 1:])
  return -jnp.sum(nll * jnp.asarray(mask, jnp.float32)[:, 1:], axis=-1)


def verify_pairs(tokenizer: tok_lib.Tokenizer, class_names: Sequence[str],
                 descriptions: Mapping[str, str] | None = None,
                 template: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """ids and answer masks [C, 2, L]: bos + verify prompt + yes/no + eos."""
  template = template or text_lib.TEMPLATES["verify"][0]
  texts = text_lib.describe_classes(class_names, descriptions=descriptions)
  examples = [text_lib.Example(text_lib.format_prompt(
      template.format(texts[name])), answer, "verify")
              for name in class_names for answer in (text_lib.YES,
                                                     text_lib.NO)]
  length = max(len(tokenizer.encode(e.prompt, bos=True))
               + len(tokenizer.encode(e.answer)) + 1 for e in examples)
  ids, masks = zip(*(tok_lib.encode_example(tokenizer, e, length)
                     for e in examples))
  shape = (len(class_names), 2, length)
  return np.reshape(ids, shape), np.reshape(masks, shape)


@functools.partial(jax.jit, static_argnames=("model", "pad_id"))
def _yes_probability(model: vlm_lib.ECGVLM, params, images, ids, masks, *,
                     pad_id: int):
  """P(yes) [B, C]: images encoded once, then one LM pass per class."""
  _, prefix = model.apply({"params": params}, images,
                          method=vlm_lib.ECGVLM.encode_image)
  prefix = jnp.repeat(prefix, 2, axis=0)  # image 0 (yes, no), image 1 ...
  lm = vlm_lib.language_model(model, parent=None)
  batch = images.shape[0]

  def one_class(pair):
    tokens, weights = (jnp.tile(x, (batch, 1)) for x in pair)
    logits, _ = lm.apply({"params": params["lm"]}, tokens, prefix=prefix,
                         mask=tokens != pad_id, taps=())
    logp = sequence_logprob(logits, tokens, weights).reshape(batch, 2)
    return jax.nn.softmax(logp, axis=-1)[:, 0]

  return jax.lax.map(one_class, (ids, masks)).T


def soft_scores(model: vlm_lib.ECGVLM, params, images,
                tokenizer: tok_lib.Tokenizer, class_names: Sequence[str],
                descriptions: Mapping[str, str] | None = None, *,
                template: str | None = None, batch_size: int = 32
                ) -> np.ndarray:
  """P("yes") [N, C] to the verify question about each class.

  softmax of log p("yes" + eos | image, prompt) against log p("no" + eos |
  image, prompt), teacher-forced (prompt and answer tokenized as in
  training); `template` defaults to the first verify template. Each image
  batch is encoded once; the LM then scores 2 * batch_size sequences per
  class (a lax.map over classes bounds the logits' memory).
  """
  ids, masks = verify_pairs(tokenizer, class_names, descriptions, template)
  out = [np.asarray(_yes_probability(
      model, params, jnp.asarray(images[i:i + batch_size]), ids, masks,
      pad_id=tokenizer.pad_id)) for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.float32)


def left_padded(tokenizer: tok_lib.Tokenizer, texts: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray]:
  """bos + text ids [B, L] padded on the left, and their real-token mask."""
  ids = tokenizer.batch_encode(texts, bos=True)
  order = np.argsort(ids != tokenizer.pad_id, axis=1, kind="stable")
  ids = np.take_along_axis(ids, order, axis=1)
  return ids, ids != tokenizer.pad_id


def generate_answers(model: vlm_lib.ECGVLM, params, images,
                     tokenizer: tok_lib.Tokenizer,
                     question: str | Sequence[str], *, max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
  """Greedy answers to one question, or to one question per image."""
  questions = [question] * len(images) if isinstance(question, str) else (
      list(question))
  ids, mask = left_padded(tokenizer,
                          [text_lib.format_prompt(q) for q in questions])
  answers = []
  for i in range(0, len(images), batch_size):
    rows = slice(i, i + batch_size)
    out = vlm_lib.generate(model, params, jnp.asarray(images[rows]),
                           jnp.asarray(ids[rows]), mask=jnp.asarray(mask[rows]),
                           max_new_tokens=max_new_tokens,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    answers += [tokenizer.decode(row) for row in np.asarray(out["tokens"])]
  return answers


def normalise(answer: str) -> str:
  """Lower case, single spaces, no trailing period (QA exact match)."""
  return " ".join(answer.lower().split()).rstrip(".").rstrip()


def soft_metrics(scores, labels, class_names: Sequence[str]) -> dict:
  """{"soft/macro_auc", "soft/auc/<c>"}: ROC-AUC of the P(yes) scores."""
  return {f"soft/{k}": v for k, v in metrics_lib.multilabel_auc(
      np.asarray(labels), np.asarray(scores), class_names).items()}


def evaluate(model: vlm_lib.ECGVLM, params, images, labels,
             tokenizer: tok_lib.Tokenizer, class_names: Sequence[str],
             descriptions: Mapping[str, str] | None = None, *,
             qa: Sequence[tuple[int, str, str]] | None = None,
             max_new_tokens: int = 64, batch_size: int = 32) -> dict:
  """Hard (query answers), soft (verify P(yes)) and QA metrics; see above.

  Returns {"hard/macro_auc", "hard/auc/<c>", "hard/macro_f1", "hard/f1/<c>",
  "hard/accuracy" (exact match), "hard/hamming_loss", "soft/macro_auc",
  "soft/auc/<c>", "n"} and "qa/accuracy" when `qa` (image index, question,
  answer) triples are given.
  """
  kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
  answers = generate_answers(model, params, images, tokenizer,
                             text_lib.TEMPLATES["query"][0], **kw)
  pred = np.stack([parse_classes(a, class_names, descriptions)
                   for a in answers])
  labels = np.asarray(labels)
  out = {f"hard/{k}": v for k, v in hard_metrics(pred, labels,
                                                 class_names).items()}
  out.update(soft_metrics(soft_scores(
      model, params, images, tokenizer, class_names, descriptions,
      batch_size=batch_size), labels, class_names))
  if qa:
    index, questions, truth = zip(*qa)
    said = generate_answers(model, params, np.asarray(images)[list(index)],
                            tokenizer, list(questions), **kw)
    out["qa/accuracy"] = float(np.mean(
        [normalise(s) == normalise(t) for s, t in zip(said, truth)]))
  out["n"] = len(images)
  return out
