"""The vision-language task of the train step (train/step.py's `task`).

A VLM batch holds one rendered ECG image and the same question/answer
tokenized by each tokenizer (`vlm/data.py`):

  image            [B, H, W, 1] float32 ink in [0, 1]
  tokens_<tok>     [B, L] int32 inputs: bos + prompt + answer (+ eos), padded
  targets_<tok>    [B, L] int32 the next token of each input position
  attn_<tok>       [B, L] bool  real (not padding) input positions
  answer_<tok>     [B, L] bool  positions whose target is an answer token/eos

for <tok> in ("teacher", "student"), plus "labels" [B, C] and "id" [B].
"""

from __future__ import annotations

import dataclasses

from evl_ecg_jax.losses import task as task_losses

TOKENIZERS = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class VLMTask:
  """Models read the image and their tokenizer's tokens; the task loss is
  the next-token CE on the answer; distillation compares the two
  sequences through masks (MHCA/relation: real tokens; ULD: answers).

  `trained`: the tokenizer of the model being trained ("teacher" when a
  teacher VLM trains on the task loss, "student" when it is distilled).
  """
  trained: str = "student"

  def tokens_of(self, role: str) -> str:
    """The tokenizer a step role ("student" = trained model) reads."""
    return self.trained if role == "student" else "teacher"

  def inputs(self, batch, role):
    tok = self.tokens_of(role)
    return (batch["image"], batch[f"tokens_{tok}"]), {
        "mask": batch[f"attn_{tok}"]}

  def masks(self, batch):
    """MHCA/relation read real tokens; ULD compares answer positions."""
    tok = self.tokens_of("student")
    return {"student_hidden": batch[f"attn_{tok}"],
            "teacher_hidden": batch.get("attn_teacher"),
            "student_logits": batch[f"answer_{tok}"],
            "teacher_logits": batch.get("answer_teacher")}

  def loss(self, objective, head_params, student_out, teacher_out, batch,
           axis_name=None):
    """(loss, terms); the token CE is the global batch's mean over answer
    tokens (`axis_name`: the step's data axis, None: every row here)."""
    tok = self.tokens_of("student")
    ce = task_losses.token_ce_loss(student_out[0], batch[f"targets_{tok}"],
                                   mask=batch[f"answer_{tok}"],
                                   axis_name=axis_name)
    return objective.combine(ce, head_params, student_out, teacher_out,
                             masks=self.masks(batch), axis_name=axis_name)
