"""Logit distillation baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def logit_kd_loss(teacher_logits, student_logits, *, temperature, mask=None):
  """Multi-label logit KD (Hinton et al. 2015, per-class Bernoulli form).

  L_KD = T² · mean_c KL(σ(z_t,c / T) ‖ σ(z_s,c / T)), the binary KL between
  the teacher's and the student's tempered sigmoid probabilities, so that the
  gradient scale does not shrink with T.

  Args:
    teacher_logits: [B, C].
    student_logits: [B, C].
    temperature: T > 0.
    mask: optional [B] bool, True = example counts.

  Returns:
    Scalar float32 ≥ 0, zero iff the logits agree.
  """
  t, s = _ops.f32(teacher_logits, student_logits)
  t, s = t / temperature, s / temperature
  p = jax.nn.sigmoid(t)
  # KL(Bern(p)‖Bern(q)) with log q = log σ(s), log(1-q) = log σ(-s).
  kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
        + (1 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
  return temperature**2 * _ops.masked_mean(jnp.mean(kl, axis=-1), mask)


def _kl(log_p, log_q):
  """Σ_k p_k (log p_k − log q_k) over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def softmax_kd_loss(teacher_logits, student_logits, *, temperature=1.0,
                    mask=None):
  """Softmax logit KD (Hinton et al. 2015).

  L_KD = T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)); the T² keeps the
  gradient scale independent of T.

  Args:
    teacher_logits: [B, C] (or [B, L, V] per-token logits).
    student_logits: same shape as `teacher_logits`.
    temperature: T > 0.
    mask: optional bool [B] (or [B, L]), True = example / token counts.

  Returns:
    Scalar float32 ≥ 0: mean over the valid examples (tokens).
  """
  t, s = _ops.f32(teacher_logits, student_logits)
  kl = _kl(jax.nn.log_softmax(t / temperature),
           jax.nn.log_softmax(s / temperature))
  return temperature**2 * _ops.masked_mean(kl, mask)


def _dkd_log_probs(logits, target):
  """Binary [log p_y, log(1 − p_y)] and non-target log p̂ (target entry 0)."""
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  lse_nt = jax.nn.logsumexp(jnp.where(target, -jnp.inf, logits), axis=-1,
                            keepdims=True)
  log_y = jnp.sum(jnp.where(target, logits, 0.0), axis=-1, keepdims=True)
  binary = jnp.concatenate([log_y, lse_nt], axis=-1) - lse
  # 0 at the target (not −inf) keeps _kl and its gradient finite there.
  return binary, jnp.where(target, 0.0, logits - lse_nt)


def dkd_loss(teacher_logits, student_logits, labels, *, temperature,
             alpha=1.0, beta=8.0, mask=None):
  """Decoupled KD (Zhao et al., CVPR 2022).

  DKD = T² (α · TCKD + β · NCKD), with, at temperature T,
    TCKD = KL(b^t ‖ b^s), b = [p_y, 1 − p_y] the target / non-target mass;
    NCKD = KL(p̂^t ‖ p̂^s), p̂ = softmax over the non-target classes only.
  The paper rewrites classical KD as KD = TCKD + (1 − p^t_y) · NCKD, so for
  one example α = 1, β = 1 − p^t_y gives `softmax_kd_loss`.
  Defaults α = 1, β = 8, T = 4 are the paper's CIFAR-100 settings.

  Args:
    teacher_logits: [B, C].
    student_logits: [B, C].
    labels: [B] int ground-truth class ids.
    alpha: TCKD weight α.
    beta: NCKD weight β.
    temperature: T > 0.
    mask: optional [B] bool, True = example counts.

  Returns:
    Scalar float32 ≥ 0: mean over the valid examples.
  """
  t, s = _ops.f32(teacher_logits, student_logits)
  target = jax.nn.one_hot(labels, t.shape[-1], dtype=bool)
  (bin_t, nt_t), (bin_s, nt_s) = (_dkd_log_probs(x / temperature, target)
                                  for x in (t, s))
  per_example = alpha * _kl(bin_t, bin_s) + beta * _kl(nt_t, nt_s)
  return temperature**2 * _ops.masked_mean(per_example, mask)


def _valid_first(x, mask, length):
  """x [B, L, ...] with the valid positions first (in order), cut to length."""
  order = jnp.argsort(~mask, axis=1, stable=True)
  return jnp.take_along_axis(x, order[:, :length, None], axis=1)


def uld_loss(teacher_logits, student_logits, *, temperature=1.0,
             teacher_mask=None, student_mask=None, axis_name=None):
  """Universal Logit Distillation (Boizard et al. 2024).

  Teacher and student may have different vocabularies. At each aligned
  position, both softmax(z / T) distributions are sorted in decreasing order,
  the shorter one is zero-padded to max(Vt, Vs), and
    L_ULD = Σ_i |p^s_(i) − p^t_(i)|,
  the closed-form 1-D Wasserstein distance between the ranked distributions
  (no T² factor, as in the paper). Positions are paired as in the authors'
  code: the k-th valid (answer) teacher position with the k-th valid student
  one, pairs beyond the shorter count are dropped; the loss is the mean over
  an example's pairs, then over the examples that have one.

  Args:
    teacher_logits: [B, Lt, Vt] (or [B, Vt]).
    student_logits: [B, Ls, Vs] (or [B, Vs]).
    temperature: T > 0.
    teacher_mask: optional [B, Lt] (or [B]) bool, True = valid position.
    student_mask: optional [B, Ls] (or [B]) bool, True = valid position.
    axis_name: data axis of a per-device step: the mean is over the
      examples of every device that have a pair (None: of this call).

  Returns:
    Scalar float32 in [0, 2].
  """
  t, s = _ops.f32(teacher_logits, student_logits)
  if t.ndim != s.ndim or t.ndim not in (2, 3) or t.shape[0] != s.shape[0]:
    raise ValueError(f"uld_loss: teacher {t.shape} and student {s.shape} must "
                     "both be [B, V] or [B, L, V] with the same batch.")
  if t.ndim == 2:
    t, s = t[:, None], s[:, None]
    teacher_mask, student_mask = (None if m is None else jnp.asarray(m)[:, None]
                                  for m in (teacher_mask, student_mask))
  length, width = min(t.shape[1], s.shape[1]), max(t.shape[-1], s.shape[-1])
  ranked, counts = [], []
  for x, m in ((t, teacher_mask), (s, student_mask)):
    m = jnp.ones(x.shape[:2], bool) if m is None else jnp.asarray(m, bool)
    p = -jnp.sort(-jax.nn.softmax(x / temperature), axis=-1)
    p = jnp.pad(p, ((0, 0), (0, 0), (0, width - x.shape[-1])))
    ranked.append(_valid_first(p, m, length))
    counts.append(jnp.sum(m, axis=1))
  pairs = jnp.minimum(*counts)
  l1 = jnp.sum(jnp.abs(ranked[0] - ranked[1]), axis=-1)
  paired = jnp.arange(length) < pairs[:, None]
  per_example = jnp.sum(jnp.where(paired, l1, 0.0), axis=1) / jnp.maximum(
      pairs, 1)
  return _ops.masked_mean(per_example, pairs > 0, axis_name=axis_name)


def _pearson_distance(x, y):
  """1 − Pearson correlation of each row of x and y [R, K]: [R] (the cosine
  of the centred rows; a constant row correlates 0)."""
  centred = lambda z: _ops.unit_rows(z - jnp.mean(z, -1, keepdims=True))
  return 1.0 - jnp.sum(centred(x) * centred(y), axis=-1)


def dist_loss(teacher_logits, student_logits, *, inter_weight, intra_weight,
              temperature, axis_name=None):
  """DIST (Huang et al., NeurIPS 2022): correlations of the probabilities.

  With Y = softmax(Z / τ) over the classes, [B, C], and d_p(u, v) = 1 −
  Pearson(u, v):
    L_inter = mean_i d_p(Y^s_i,:, Y^t_i,:)   (each record's class ranking),
    L_intra = mean_c d_p(Y^s_:,c, Y^t_:,c)   (each class across the batch),
    L = τ² (β L_inter + γ L_intra).
  The intra-class relation compares records, so both Y are gathered over
  `axis_name` first: the global batch's value on every device.

  Args:
    teacher_logits: [b, C].
    student_logits: [b, C].
    inter_weight: β.
    intra_weight: γ.
    temperature: τ > 0.
    axis_name: the data axis of a per-device step, or None.

  Returns:
    Scalar float32 in [0, 2 τ² (β + γ)] (B ≥ 2 for the intra term).
  """
  t, s = _ops.f32(teacher_logits, student_logits)
  if t.ndim != 2 or t.shape != s.shape:
    raise ValueError(f"dist_loss: teacher {t.shape} and student {s.shape} "
                     "must both be [B, C].")
  y_t, y_s = (_ops.global_rows(jax.nn.softmax(x / temperature), axis_name)
              for x in (t, s))
  inter = jnp.mean(_pearson_distance(y_s, y_t))
  intra = jnp.mean(_pearson_distance(y_s.T, y_t.T))
  return temperature**2 * (inter_weight * inter + intra_weight * intra)
