"""Loop-level numpy references of the feature-distillation baselines.

Written from the papers' definitions, not from evl_ecg_jax.losses.
"""

import numpy as np


def _valid(mask, b, n):
  return [i for i in range(n) if mask is None or mask[b][i]]


def mse_np(teacher, student, mask=None):
  """Mean of (t − s)² over valid tokens [B, N] and all channels."""
  sq = [np.sum((teacher[b, i] - student[b, i]) ** 2) / teacher.shape[-1]
        for b in range(teacher.shape[0])
        for i in _valid(mask, b, teacher.shape[1])]
  return float(np.mean(sq))


def tinybert_np(teacher_hiddens, student_hiddens, teacher_attn, student_attn,
                layer_map, w=None, mask=None):
  """Jiao et al. 2020: Σ_layers MSE(H_s W, H_t) + (1/h) Σ_h MSE(A_s, A_t)."""
  total = 0.0
  for m, n in layer_map:
    hs = student_hiddens[m] if w is None else student_hiddens[m] @ w
    total += mse_np(teacher_hiddens[n], hs, mask)
    if teacher_attn is None:
      continue
    at, as_ = teacher_attn[n], student_attn[m]
    per_head = []
    for head in range(at.shape[1]):
      sq = [(at[b, head, i, j] - as_[b, head, i, j]) ** 2
            for b in range(at.shape[0])
            for i in _valid(mask, b, at.shape[2])
            for j in _valid(mask, b, at.shape[3])]
      per_head.append(np.mean(sq))
    total += np.mean(per_head)
  return float(total)
