"""Loop-level numpy reference of the EVL-ECG geometric relation loss.

Written from the paper's definition, not from evl_ecg_jax.losses.
"""

import numpy as np


def relation_loss_np(teacher, student, mask=None):
  """½(L_D + L_A) per sequence over valid pairs i≠j, averaged over the batch."""
  batch, n = teacher.shape[:2]
  mask = np.ones((batch, n), bool) if mask is None else np.asarray(mask, bool)
  losses = []
  for b in range(batch):
    valid = np.flatnonzero(mask[b])
    pairs = [(i, j) for i in valid for j in valid if i != j]

    def dists(x):
      d = {p: np.linalg.norm(x[p[0]] - x[p[1]]) for p in pairs}
      mean = np.mean(list(d.values()))
      return {p: v / mean for p, v in d.items()}

    def cosines(x):
      return {(i, j): x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
              for i, j in pairs}

    dt, ds = dists(teacher[b]), dists(student[b])
    at, as_ = cosines(teacher[b]), cosines(student[b])
    loss_d = np.mean([(dt[p] - ds[p]) ** 2 for p in pairs])
    loss_a = np.mean([(at[p] - as_[p]) ** 2 for p in pairs])
    losses.append(0.5 * (loss_d + loss_a))
  return float(np.mean(losses))
