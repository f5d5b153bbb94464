"""VLM batches from the ECG pipeline: render, pick a question, tokenize.

`VLMBatches` wraps the grain train iterator (one shuffled stream, as for
the signal models) and turns each signal batch into the batch of
`vlm/task.py`: every record is rendered as a 12-lead printout
(`vlm/render.py`), resized to the ViT's image size, and given one
question/answer drawn from its labels (`vlm/text.py`, seeded by the batch
count and the row), tokenized by both tokenizers. Its state (the grain
state and the batch count) is what a checkpoint stores, so a resumed run
draws the same questions.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
import scipy.ndimage

from evl_ecg_jax.vlm import render as render_lib
from evl_ecg_jax.vlm import text as text_lib
from evl_ecg_jax.vlm import tokenizer as tokenizer_lib


def images(ecg: np.ndarray, fs: float, size: Sequence[int],
           spec: render_lib.RenderSpec = render_lib.RenderSpec()
           ) -> np.ndarray:
  """[B, T, 12] mV -> [B, H, W, 1] float32 ink (1 = trace, 0 = paper).

  The printout is drawn at `spec` and resized (bilinear) to `size`, as a
  VLM's image processor resizes any printout to its input size.
  """
  paper = render_lib.render(np.asarray(ecg, np.float32), fs, spec=spec)
  ink = 1.0 - paper.astype(np.float32) / 255.0
  zoom = (1.0, size[0] / ink.shape[1], size[1] / ink.shape[2])
  out = scipy.ndimage.zoom(ink, zoom, order=1, grid_mode=True,
                           mode="nearest")
  return np.clip(out, 0.0, 1.0)[..., None]


def batch_shapes(image_size: Sequence[int], max_len: int,
                 batch: int) -> dict:
  """{name: jax.ShapeDtypeStruct} of the model batch the step reads (the
  arrays of `Batcher` less ids and labels): the ahead-of-time compile's
  input (evl_ecg_jax/aot.py)."""
  sds = jax.ShapeDtypeStruct
  out = {"image": sds((batch, *image_size, 1), np.float32)}
  for name in ("teacher", "student"):
    out.update({f"tokens_{name}": sds((batch, max_len), np.int32),
                f"targets_{name}": sds((batch, max_len), np.int32),
                f"attn_{name}": sds((batch, max_len), np.bool_),
                f"answer_{name}": sds((batch, max_len), np.bool_)})
  return out


def tokenize(tokenizer: tokenizer_lib.Tokenizer,
             examples: Sequence[text_lib.Example], max_len: int,
             name: str) -> dict:
  """{tokens, targets, attn, answer}_<name> arrays [B, max_len] (see
  vlm/task.py). A sequence longer than max_len + 1 tokens raises
  ValueError naming config.vlm.max_len."""
  ids, loss = [], []
  for ex in examples:
    try:
      i, m = tokenizer_lib.encode_example(tokenizer, ex, max_len + 1)
    except ValueError as e:
      raise ValueError(f"config.vlm.max_len={max_len}: the {name} "
                       f"tokenizer needs more for {ex}: {e}") from None
    ids.append(i)
    loss.append(m)
  ids, loss = np.stack(ids), np.stack(loss)
  return {f"tokens_{name}": ids[:, :-1], f"targets_{name}": ids[:, 1:],
          f"attn_{name}": ids[:, :-1] != tokenizer.pad_id,
          f"answer_{name}": loss[:, 1:] > 0}


@dataclasses.dataclass(frozen=True)
class Batcher:
  """Signal batch -> VLM batch (pure given the batch and its count)."""
  tokenizers: Mapping[str, tokenizer_lib.Tokenizer]
  class_names: tuple
  descriptions: Mapping[str, str]
  sampling_rate: float
  image_size: tuple
  max_len: int
  spec: render_lib.RenderSpec = render_lib.RenderSpec()
  kinds: tuple = text_lib.KINDS
  seed: int = 0

  def questions(self, labels: np.ndarray, count: int) -> list:
    """One Example per row, drawn with a (seed, count, row) generator."""
    return [text_lib.examples(
        row, self.class_names, self.descriptions,
        np.random.default_rng([self.seed, count, i]), 1, self.kinds)[0]
            for i, row in enumerate(labels)]

  def images(self, ecg: np.ndarray) -> np.ndarray:
    """[B, T, 12] -> [B, H, W, 1] model images (see `images`)."""
    return images(ecg, self.sampling_rate, self.image_size, self.spec)

  def __call__(self, batch: Mapping[str, np.ndarray], count: int,
               examples: Sequence[text_lib.Example] | None = None) -> dict:
    examples = examples or self.questions(batch["labels"], count)
    out = {"image": self.images(batch["ecg"]),
           "labels": batch["labels"], "id": batch["id"]}
    for name, tok in self.tokenizers.items():
      out.update(tokenize(tok, examples, self.max_len, name))
    return out


class VLMBatches:
  """Checkpointable iterator of VLM batches over a signal batch iterator."""

  def __init__(self, signals: Iterator, batcher: Batcher):
    self._signals, self._batcher, self._count = signals, batcher, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = self._batcher(next(self._signals), self._count)
    self._count += 1
    return out

  def get_state(self) -> dict:
    return {"signals": self._signals.get_state(), "count": self._count}

  def set_state(self, state: Mapping) -> None:
    self._signals.set_state(state["signals"])
    self._count = int(state["count"])
