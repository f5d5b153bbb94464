"""Loop-level numpy references of the logit / relational KD baselines and the
softmax task losses.

Written from the papers' definitions, not from evl_ecg_jax.losses.
"""

import numpy as np


def _softmax(z):
  e = np.exp(z - np.max(z))
  return e / e.sum()


def _kl(p, q):
  return sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax_kd_np(teacher, student, temperature=1.0, mask=None):
  """Hinton et al. 2015: T² KL(softmax(t/T) ‖ softmax(s/T)), mean over rows."""
  t = teacher.reshape(-1, teacher.shape[-1])
  s = student.reshape(-1, student.shape[-1])
  keep = np.ones(len(t), bool) if mask is None else np.ravel(mask)
  kls = [_kl(_softmax(t[r] / temperature), _softmax(s[r] / temperature))
         for r in range(len(t)) if keep[r]]
  return float(temperature**2 * np.mean(kls))


def dkd_np(teacher, student, labels, alpha=1.0, beta=8.0, temperature=4.0,
           mask=None):
  """Zhao et al. 2022: T²(α KL(b_t‖b_s) + β KL(p̂_t‖p̂_s)), mean over rows."""
  keep = np.ones(len(teacher), bool) if mask is None else np.asarray(mask)
  out = []
  for r in np.flatnonzero(keep):
    y = labels[r]
    pt = _softmax(teacher[r] / temperature)
    ps = _softmax(student[r] / temperature)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [c for c in range(len(pt)) if c != y]
    nckd = _kl([pt[c] / (1 - pt[y]) for c in others],
               [ps[c] / (1 - ps[y]) for c in others])
    out.append(temperature**2 * (alpha * tckd + beta * nckd))
  return float(np.mean(out))


def uld_np(teacher, student, temperature=1.0, teacher_mask=None,
           student_mask=None):
  """Boizard et al. 2024: Σ_i |sorted p_s − sorted p_t| (zero-padded).

  teacher [B, Lt, Vt], student [B, Ls, Vs]; the k-th valid teacher position
  is paired with the k-th valid student one; mean over an example's pairs,
  then over the examples with at least one pair.
  """
  per_example = []
  for b in range(len(teacher)):
    tpos = [l for l in range(teacher.shape[1])
            if teacher_mask is None or teacher_mask[b][l]]
    spos = [l for l in range(student.shape[1])
            if student_mask is None or student_mask[b][l]]
    dists = []
    for lt, ls in zip(tpos, spos):
      pt = sorted(_softmax(teacher[b, lt] / temperature), reverse=True)
      ps = sorted(_softmax(student[b, ls] / temperature), reverse=True)
      width = max(len(pt), len(ps))
      pt += [0.0] * (width - len(pt))
      ps += [0.0] * (width - len(ps))
      dists.append(sum(abs(a - c) for a, c in zip(ps, pt)))
    if dists:
      per_example.append(np.mean(dists))
  return float(np.mean(per_example))


def token_ce_np(logits, targets, mask=None):
  """−log softmax(z_bl)[y_bl] averaged over the valid tokens."""
  nll = [-np.log(_softmax(logits[b, l])[targets[b, l]])
         for b in range(logits.shape[0]) for l in range(logits.shape[1])
         if mask is None or mask[b, l]]
  return float(np.mean(nll)) if nll else 0.0


def _huber(x):
  return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_np(teacher, student, distance_weight=1.0, angle_weight=2.0):
  """Park et al. 2019: Huber on mean-normalised distances and on angles."""
  n = len(teacher)
  pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
  triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)
              if len({i, j, k}) == 3]

  def psi_d(x):
    d = {p: np.linalg.norm(x[p[0]] - x[p[1]]) for p in pairs}
    mu = np.mean(list(d.values()))
    return {p: v / mu for p, v in d.items()}

  def psi_a(x):
    out = {}
    for i, j, k in triplets:
      e_ij = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
      e_kj = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
      out[(i, j, k)] = e_ij @ e_kj
    return out

  dt, ds = psi_d(teacher), psi_d(student)
  at, as_ = psi_a(teacher), psi_a(student)
  loss_d = np.mean([_huber(ds[p] - dt[p]) for p in pairs])
  loss_a = np.mean([_huber(as_[p] - at[p]) for p in triplets])
  return float(distance_weight * loss_d + angle_weight * loss_a)


def crd_np(teacher, student, temperature):
  """Tian et al. 2020, in-batch softmax form: each record's own (t_i, s_i)
  pair against the batch's other records, from both anchors, on
  L2-normalised embeddings; ½ the sum of the two mean NLLs."""
  t = [x / np.linalg.norm(x) for x in teacher]
  s = [x / np.linalg.norm(x) for x in student]
  n = len(t)
  total = 0.0
  for anchor, others in ((s, t), (t, s)):
    for i in range(n):
      scores = [float(np.dot(anchor[i], others[j])) / temperature
                for j in range(n)]
      log_norm = np.log(sum(np.exp(v) for v in scores))
      total += -(scores[i] - log_norm) / n
  return 0.5 * total


def _pearson(u, v):
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  du, dv = u - u.mean(), v - v.mean()
  return float((du * dv).sum() / np.sqrt((du**2).sum() * (dv**2).sum()))


def dist_np(teacher, student, beta, gamma, temperature):
  """Huang et al. 2022, DIST: τ²(β·mean_i (1 − ρ(Y^s_i, Y^t_i)) +
  γ·mean_c (1 − ρ(Y^s_:c, Y^t_:c))), Y = softmax(Z / τ) per record."""
  y_t = np.array([_softmax(z / temperature) for z in teacher])
  y_s = np.array([_softmax(z / temperature) for z in student])
  inter = np.mean([1 - _pearson(y_s[i], y_t[i]) for i in range(len(y_s))])
  intra = np.mean([1 - _pearson(y_s[:, c], y_t[:, c])
                   for c in range(y_s.shape[1])])
  return float(temperature**2 * (beta * inter + gamma * intra))
