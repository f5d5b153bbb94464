"""The EVL-ECG objective: L = (1 − α)·L_CE + α·Σ_k λ_k·L_k (EVL-ECG Eq. 9).

For now the distillation sum holds the logit-KD term; the MHCA, OT and
relation terms plug in as further (λ_k, L_k) entries of the same sum.
"""

from __future__ import annotations

from typing import Callable

from evl_ecg_jax.losses import kd, task


def make_objective(*, alpha: float, kd_temperature: float) -> Callable:
  """Returns objective(student_out, teacher_out, labels) -> (total, terms).

  `student_out`/`teacher_out` are a model's `(logits, features)` pair;
  `teacher_out` is only read when α > 0, so it may be None for α = 0. `terms` holds every
  unweighted term so each gets logged.
  """
  distill = {"kd": (1.0, lambda t, s: kd.logit_kd_loss(
      t[0], s[0], temperature=kd_temperature))}

  def objective(student_out, teacher_out, labels):
    terms = {"ce": task.sigmoid_bce_loss(student_out[0], labels)}
    total = (1.0 - alpha) * terms["ce"]
    if alpha > 0:
      for name, (weight, fn) in distill.items():
        terms[name] = fn(teacher_out, student_out)
        total = total + alpha * weight * terms[name]
    return total, terms

  return objective
