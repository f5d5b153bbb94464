"""Logit distillation baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops


def logit_kd_loss(teacher_logits, student_logits, *, temperature=1.0,
                  mask=None):
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
