"""The EVL-ECG objective (EVL-ECG Eq. 9) and the learned heads of its terms.

    L = (1 − α)·L_task + α·(λ_kd·L_kd + λ_m·L_mhca + λ_r·L_rel + λ_ot·L_ot)

λ_kd·L_kd (logit KD) is not in the paper's EVL sum (λ_kd = 0 there); it is
the vanilla-KD baseline of the same objective. A term whose weight is 0 is
neither computed nor logged (that is how ablations switch terms off).

Feature conventions (teacher frozen, its features under stop_gradient):
- Each term reads a named hidden state ("feature tap", `models.layers.Taps`)
  of each model: MHCA / relation the hidden states `taps["student_hidden"]`
  / `taps["teacher_hidden"]`, OT the visual tokens `taps["student_ot"]` /
  `taps["teacher_ot"]` (all "tokens", the last layer, by default). The
  aligner gives Ĥ_t = MHCA(H_s, H_t) at the student's length and width;
  L_mhca = mhca_loss(H_s, sg(Ĥ_t)), L_rel = relation_loss(sg(Ĥ_t), H_s). The
  aligner itself learns only from the reconstruction guard
  α·γ·mhca_reconstruction_loss, added whenever the aligner is used (γ =
  `mhca_reconstruction_weight`; see `losses.mhca` for why).
- OT: the student's tokens go through a learned linear projection to the
  teacher's width; both sides are then standardised per token and scaled to
  unit norm (C ∈ [0, 4], so ε has the same meaning for every model width),
  and L_ot = ot_loss(teacher, projected student). The teacher side is not
  learned, so the projection cannot collapse both clouds onto each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops
from evl_ecg_jax.losses import kd
from evl_ecg_jax.losses import mhca
from evl_ecg_jax.losses import ot
from evl_ecg_jax.losses import relation
from evl_ecg_jax.losses import task


class EVLHeads(nn.Module):
  """Learned heads of the feature losses, trained with the student.

  Takes the student/teacher hidden states (MHCA, relation) and visual
  tokens (OT); inputs of a head that is off may be None. Returns
  {"aligned", "reconstruction"} (MHCA aligner) and/or {"ot_student"}
  (student visual tokens projected to the teacher width).
  """
  aligner: bool
  ot_projection: bool
  mhca_heads: int = 4
  mhca_qkv_features: Optional[int] = None

  @nn.compact
  def __call__(self, hidden_s, hidden_t, visual_s, visual_t):
    out = {}
    if self.aligner:
      out["aligned"], out["reconstruction"] = mhca.MHCAAligner(
          self.mhca_heads, self.mhca_qkv_features, name="aligner")(
              hidden_s, hidden_t)
    if self.ot_projection:
      out["ot_student"] = nn.Dense(visual_t.shape[-1],
                                   name="ot_projection")(visual_s)
    return out


_DEFAULT_TAPS = (("student_hidden", "tokens"), ("teacher_hidden", "tokens"),
                 ("student_ot", "tokens"), ("teacher_ot", "tokens"))


def evl_loss(task_loss, distill_terms, *, alpha, weights):
  """EVL-ECG Eq. 9: L = (1 − α)·L_task + α·Σ_k λ_k·L_k.

  Args:
    task_loss: scalar L_task (L_CE).
    distill_terms: {k: scalar L_k}, every key present in `weights`.
    alpha: α ∈ [0, 1].
    weights: {k: λ_k}.

  Returns:
    Scalar total loss.
  """
  total = (1.0 - alpha) * task_loss
  for name, value in distill_terms.items():
    total = total + alpha * weights[name] * value
  return total


def unit_tokens(x):
  """Standardise each token, then scale it to unit Euclidean norm."""
  return _ops.standardize(x) / jnp.sqrt(float(x.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Objective:
  """objective(head_params, student_out, teacher_out, labels) -> (total, terms).

  `student_out`/`teacher_out` are a model's `(logits, features)` pair;
  `teacher_out` is only read when α > 0 (it may be None otherwise) and
  `head_params` only when `heads` is not None. `terms` holds every computed
  term, unweighted, for logging.
  """
  alpha: float
  weights: dict  # term name -> λ (only non-zero ones).
  heads: Optional[EVLHeads]
  # Feature tap read by each term: {student,teacher}_{hidden,ot} -> tap name.
  taps: dict = dataclasses.field(default_factory=lambda: dict(_DEFAULT_TAPS))
  kd_temperature: float = 1.0
  mhca_reconstruction_weight: float = 1.0
  ot_kwargs: dict = dataclasses.field(default_factory=dict)

  @property
  def term_weights(self) -> dict:
    """λ of every distillation term, the aligner's guard (γ) included."""
    return dict(self.weights,
                mhca_reconstruction=self.mhca_reconstruction_weight)

  def model_taps(self, role: str) -> tuple[str, ...]:
    """Feature taps this objective reads from `role` ("student"/"teacher")."""
    used = []
    if self.heads is not None and self.heads.aligner:
      used.append(self.taps[f"{role}_hidden"])
    if self.heads is not None and self.heads.ot_projection:
      used.append(self.taps[f"{role}_ot"])
    return tuple(dict.fromkeys(used))

  def _head_inputs(self, s_feats, t_feats):
    """(H_s, H_t, V_s, V_t): hidden states and visual tokens (None if off)."""
    pick = lambda feats, key, on: feats[self.taps[key]] if on else None
    aligner, ot_on = self.heads.aligner, self.heads.ot_projection
    return (pick(s_feats, "student_hidden", aligner),
            pick(t_feats, "teacher_hidden", aligner),
            pick(s_feats, "student_ot", ot_on),
            pick(t_feats, "teacher_ot", ot_on))

  def init_heads(self, rng, student_feats, teacher_feats):
    """Params of the learned heads (None without heads), from feature shapes."""
    if self.heads is None:
      return None
    return self.heads.init(rng, *self._head_inputs(
        student_feats, teacher_feats))["params"]

  def distill_terms(self, head_params, student_out, teacher_out):
    """Unweighted distillation terms {name: scalar}."""
    (s_logits, s_feats), (t_logits, t_feats) = student_out, teacher_out
    t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))
    terms, head = {}, {}
    if self.heads is not None:
      h_s, h_t, v_s, v_t = self._head_inputs(s_feats, t_feats)
      head = self.heads.apply({"params": head_params}, h_s, h_t, v_s, v_t)
    if "kd" in self.weights:
      terms["kd"] = kd.logit_kd_loss(t_logits, s_logits,
                                     temperature=self.kd_temperature)
    if "aligned" in head:
      aligned = jax.lax.stop_gradient(head["aligned"])
      terms["mhca_reconstruction"] = mhca.mhca_reconstruction_loss(
          h_t, head["reconstruction"])
      if "mhca" in self.weights:
        terms["mhca"] = mhca.mhca_loss(h_s, aligned)
      if "relation" in self.weights:
        terms["relation"] = relation.relation_loss(aligned, h_s)
    if "ot" in self.weights:
      terms["ot"] = ot.ot_loss(unit_tokens(v_t),
                               unit_tokens(head["ot_student"]),
                               **self.ot_kwargs)
    return terms

  def __call__(self, head_params, student_out, teacher_out, labels):
    ce = task.sigmoid_bce_loss(student_out[0], labels)
    distill = {}
    if self.alpha > 0:
      distill = self.distill_terms(head_params, student_out, teacher_out)
    total = evl_loss(ce, distill, alpha=self.alpha,
                     weights=self.term_weights)
    return total, {"ce": ce, **distill}


def make_objective(*, alpha: float, kd_weight: float = 0.0,
                   mhca_weight: float = 0.0, relation_weight: float = 0.0,
                   ot_weight: float = 0.0, kd_temperature: float = 1.0,
                   student_hidden_tap: str = "tokens",
                   teacher_hidden_tap: str = "tokens",
                   student_ot_tap: str = "tokens",
                   teacher_ot_tap: str = "tokens", mhca_heads: int = 4,
                   mhca_qkv_features: Optional[int] = None,
                   mhca_reconstruction_weight: float = 1.0,
                   ot_epsilon: float = 0.1, ot_plan_gradient: str = "implicit",
                   ot_threshold: float = 1e-3,
                   ot_max_iterations: int = 1000) -> Objective:
  """Builds the objective L (EVL-ECG Eq. 9) from floats (never a config).

  α = 0 gives the task loss alone (no teacher, no heads). Weights are
  λ_kd, λ_m, λ_r, λ_ot; a zero weight switches its term off.
  `mhca_qkv_features` 0 or None means the student width. The `*_tap`
  arguments name the feature tap each term reads (models.layers.Taps).
  """
  weights: dict[str, Any] = {
      name: float(w) for name, w in (("kd", kd_weight), ("mhca", mhca_weight),
                                     ("relation", relation_weight),
                                     ("ot", ot_weight)) if w}
  if alpha == 0:
    weights = {}
  use_aligner = "mhca" in weights or "relation" in weights
  heads = None
  if use_aligner or "ot" in weights:
    heads = EVLHeads(aligner=use_aligner, ot_projection="ot" in weights,
                     mhca_heads=mhca_heads,
                     mhca_qkv_features=mhca_qkv_features)
  return Objective(
      alpha=float(alpha), weights=weights, heads=heads,
      taps=dict(student_hidden=student_hidden_tap,
                teacher_hidden=teacher_hidden_tap, student_ot=student_ot_tap,
                teacher_ot=teacher_ot_tap),
      kd_temperature=float(kd_temperature),
      mhca_reconstruction_weight=float(mhca_reconstruction_weight),
      ot_kwargs=dict(epsilon=float(ot_epsilon), plan_gradient=ot_plan_gradient,
                     threshold=float(ot_threshold),
                     max_iterations=int(ot_max_iterations)))
