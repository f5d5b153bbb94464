"""The distillation objective: EVL-ECG (Eq. 9) and the KD baselines as weights.

    L = (1 − α)·L_task + α·Σ_k λ_k·L_k

over the terms k of TERMS. EVL-ECG is λ_m, λ_r, λ_ot > 0 (the paper's sum);
each baseline is one term of the same sum (logit KD "kd", FitNet, RKD, DKD,
TinyBERT-style hints, ULD), so every row of a comparison runs through one
objective and one train step. A term whose weight is 0 is neither computed
nor logged (that is how ablations switch terms off).

Feature conventions (teacher frozen, its outputs under stop_gradient). Each
term reads named hidden states ("feature taps", `models.layers.Taps`) of
each model; `taps` maps {student,teacher}_{hidden,ot,embed} to tap names:
- MHCA / relation (`hidden`): the aligner gives Ĥ_t = MHCA(H_s, H_t) at the
  student's length and width; L_mhca = mhca_loss(H_s, sg(Ĥ_t)),
  L_rel = relation_loss(sg(Ĥ_t), H_s). The aligner learns only from the
  reconstruction guard α·γ·mhca_reconstruction_loss (see `losses.mhca`).
- OT (`ot`): the student's tokens are projected (learned) to the teacher's
  width; both sides are standardised per token at unit norm (C ∈ [0, 4])
  and L_ot = ot_loss(teacher, projected student).
- FitNet (`hidden`): MSE between the teacher's tokens, average-pooled to the
  student's length, and the student's through a learned regressor.
- TinyBERT-style: the FitNet term summed over `tinybert_layer_map` pairs
  (student tap, teacher tap), one regressor each (the attention term needs
  attention maps that a conv student does not have; not used here).
- RKD (`embed`): batch distance and angle relations of pooled embeddings.
- DKD, ULD, KD: on the logits. DKD is single-label; for multi-label ECGs its
  target is the positive class the teacher scores highest (the teacher's
  top class for an unlabelled or label-free record).
The task loss reads only examples whose `label_mask` is True (the labels
protocol); every distillation term uses all examples.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops
from evl_ecg_jax.losses import hints
from evl_ecg_jax.losses import kd
from evl_ecg_jax.losses import mhca
from evl_ecg_jax.losses import ot
from evl_ecg_jax.losses import relation
from evl_ecg_jax.losses import task
from evl_ecg_jax.losses.evl import evl_loss
from evl_ecg_jax.losses.evl import unit_tokens

TERMS = ("kd", "mhca", "relation", "ot", "fitnet", "tinybert", "rkd", "dkd",
         "uld")
_DEFAULT_TAPS = (("student_hidden", "tokens"), ("teacher_hidden", "tokens"),
                 ("student_ot", "tokens"), ("teacher_ot", "tokens"),
                 ("student_embed", "pooled"), ("teacher_embed", "pooled"))


class DistillHeads(nn.Module):
  """Learned heads of the feature terms, trained with the student.

  Called on the student's and the teacher's {tap: hidden}; returns
  {"aligned", "reconstruction"} (MHCA aligner), {"ot_student"} (student
  tokens projected to the teacher width), {"fitnet"} and {"tinybert{i}"}
  (hint regressors to the teacher width), for the heads that are on.
  """
  taps: tuple  # ((key, tap name), ...), see module docstring.
  aligner: bool = False
  ot_projection: bool = False
  fitnet: bool = False
  tinybert_layer_map: tuple = ()  # ((student tap, teacher tap), ...)
  mhca_heads: int = 4
  mhca_qkv_features: Optional[int] = None
  mhca_time_sigma: float = 0.0  # see losses.mhca.MHCAAligner
  mhca_temperature: float = 1.0
  mhca_projection: bool = False  # L_mhca on a learned map of H_s

  @nn.compact
  def __call__(self, s_feats, t_feats, masks=None):
    tap, masks = dict(self.taps), masks or {}
    h_s, h_t = s_feats.get(tap["student_hidden"]), t_feats.get(
        tap["teacher_hidden"])
    out = {}
    if self.aligner:
      out["aligned"], out["reconstruction"] = mhca.MHCAAligner(
          self.mhca_heads, self.mhca_qkv_features,
          time_sigma=self.mhca_time_sigma,
          temperature=self.mhca_temperature, name="aligner")(
              h_s, h_t, teacher_mask=masks.get("teacher_hidden"),
              student_mask=masks.get("student_hidden"))
      if self.mhca_projection:
        out["mhca_student"] = nn.Dense(h_s.shape[-1], name="mhca_projection")(
            h_s)
    if self.ot_projection:
      out["ot_student"] = nn.Dense(
          t_feats[tap["teacher_ot"]].shape[-1], name="ot_projection")(
              s_feats[tap["student_ot"]])
    if self.fitnet:
      out["fitnet"] = hints.HintRegressor(h_t.shape[-1], name="fitnet")(h_s)
    for i, (s_tap, t_tap) in enumerate(self.tinybert_layer_map):
      out[f"tinybert{i}"] = hints.HintRegressor(
          t_feats[t_tap].shape[-1], name=f"tinybert{i}")(s_feats[s_tap])
    return out


def hint_loss(teacher_tokens, projected_student):
  """FitNet hint MSE after pooling the teacher to the student's length."""
  pooled = _ops.pool_tokens(teacher_tokens, projected_student.shape[1])
  return hints.fitnet_loss(pooled, projected_student)


def dkd_targets(labels, teacher_logits, label_mask=None):
  """Class ids [B] for DKD on multi-label records: the positive class the
  teacher scores highest; the teacher's top class where there is none or
  the record is unlabelled."""
  positive = labels > 0.5
  if label_mask is not None:
    positive &= jnp.asarray(label_mask, bool)[:, None]
  scores = jnp.where(positive, teacher_logits, -jnp.inf)
  return jnp.where(positive.any(-1), jnp.argmax(scores, -1),
                   jnp.argmax(teacher_logits, -1))


@dataclasses.dataclass(frozen=True)
class Objective:
  """objective(head_params, student_out, teacher_out, labels[, label_mask])
  -> (total, terms).

  `student_out`/`teacher_out` are a model's `(logits, {tap: hidden})` pair;
  `teacher_out` is only read when α > 0 (it may be None otherwise) and
  `head_params` only when `heads` is not None. `terms` holds every computed
  term, unweighted, for logging. `combine` is the same sum around any task
  loss (e.g. the token CE of a language model, with sequence masks).
  """
  alpha: float
  weights: dict  # term name -> λ (only non-zero ones).
  heads: Optional[DistillHeads]
  taps: dict = dataclasses.field(default_factory=lambda: dict(_DEFAULT_TAPS))
  kd_temperature: float = 1.0
  mhca_reconstruction_weight: float = 1.0
  dkd_alpha: float = 1.0
  dkd_beta: float = 8.0
  relation_batch_share: float = 0.0
  relation_batch_form: str = "cosine"
  # Records the teacher outputs (and teacher masks) are rolled by along the
  # batch: 0 reads each record's own teacher; 1 is the shuffled-teacher
  # control (config loss.shuffle_teacher); diagnostics add one more.
  teacher_shift: int = 0
  ot_kwargs: dict = dataclasses.field(default_factory=dict)

  @property
  def term_weights(self) -> dict:
    """λ of every distillation term, the aligner's guard (γ) included."""
    return dict(self.weights,
                mhca_reconstruction=self.mhca_reconstruction_weight)

  def model_taps(self, role: str) -> tuple[str, ...]:
    """Feature taps this objective reads from `role` ("student"/"teacher")."""
    used, h = [], self.heads
    if h is not None and (h.aligner or h.fitnet):
      used.append(self.taps[f"{role}_hidden"])
    if h is not None and h.ot_projection:
      used.append(self.taps[f"{role}_ot"])
    if h is not None:
      used += [pair[role == "teacher"] for pair in h.tinybert_layer_map]
    if "rkd" in self.weights or self._batch_relations:
      used.append(self.taps[f"{role}_embed"])
    return tuple(dict.fromkeys(used))

  @property
  def _batch_relations(self) -> bool:
    return "relation" in self.weights and self.relation_batch_share > 0

  def init_heads(self, rng, student_feats, teacher_feats):
    """Params of the learned heads (None without heads), from feature shapes
    (one compiled program: op by op took 3.5 s for the EVL heads on CPU)."""
    if self.heads is None:
      return None
    return jax.jit(self.heads.init)(rng, student_feats,
                                    teacher_feats)["params"]

  def distill_terms(self, head_params, student_out, teacher_out, labels=None,
                    label_mask=None, masks=None, *, axis_name=None):
    """Unweighted distillation terms {name: scalar}.

    `masks` (sequences of different lengths, e.g. two tokenizers) maps
    "student_hidden"/"teacher_hidden" to [B, L] bool valid-token masks of
    the hidden taps and "student_logits"/"teacher_logits" to the positions
    ULD compares; None: every position counts. `axis_name`: the data axis
    of a per-device step (None: the call sees the whole batch); every term
    is the global batch's (losses/_ops.py, docs/scale.md).
    """
    (s_logits, s_feats), (t_logits, t_feats) = student_out, teacher_out
    t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))
    w, tap, temp, masks = self.weights, self.taps, self.kd_temperature, (
        masks or {})
    (t_logits, t_feats), masks = self._teacher_view((t_logits, t_feats),
                                                    masks, axis_name)
    head = ({} if self.heads is None else self.heads.apply(
        {"params": head_params}, s_feats, t_feats, masks))
    h_s, h_t = s_feats.get(tap["student_hidden"]), t_feats.get(
        tap["teacher_hidden"])
    s_mask = masks.get("student_hidden")
    terms = {}
    if "kd" in w:
      terms["kd"] = kd.logit_kd_loss(t_logits, s_logits, temperature=temp)
    aligned = None
    if "aligned" in head:
      aligned = jax.lax.stop_gradient(head["aligned"])
      terms["mhca_reconstruction"] = mhca.mhca_reconstruction_loss(
          h_t, head["reconstruction"], mask=masks.get("teacher_hidden"))
      if "mhca" in w:
        terms["mhca"] = mhca.mhca_loss(head.get("mhca_student", h_s), aligned,
                                       mask=s_mask)
    if "relation" in w:
      terms["relation"] = self._relation(aligned, s_feats, t_feats, masks,
                                         axis_name)
    if "ot" in w:
      terms["ot"] = ot.ot_loss(unit_tokens(t_feats[tap["teacher_ot"]]),
                               unit_tokens(head["ot_student"]),
                               teacher_mask=masks.get("teacher_ot"),
                               student_mask=masks.get("student_ot"),
                               **self.ot_kwargs)
    if "fitnet" in w:
      terms["fitnet"] = hint_loss(h_t, head["fitnet"])
    if "tinybert" in w:  # each pair: FitNet on its own regressor's output
      projected = [head[f"tinybert{i}"]
                   for i in range(len(self.heads.tinybert_layer_map))]
      terms["tinybert"] = hints.tinybert_loss(
          [_ops.pool_tokens(t_feats[t_tap], p.shape[1]) for (_, t_tap), p
           in zip(self.heads.tinybert_layer_map, projected)], projected,
          layer_map=[(i, i) for i in range(len(projected))])
    if "rkd" in w:
      terms["rkd"] = relation.rkd_loss(t_feats[tap["teacher_embed"]],
                                       s_feats[tap["student_embed"]],
                                       axis_name=axis_name)
    if "dkd" in w:
      terms["dkd"] = kd.dkd_loss(
          t_logits, s_logits, dkd_targets(labels, t_logits, label_mask),
          alpha=self.dkd_alpha, beta=self.dkd_beta, temperature=temp)
    if "uld" in w:
      terms["uld"] = kd.uld_loss(
          t_logits, s_logits, temperature=temp,
          teacher_mask=masks.get("teacher_logits"),
          student_mask=masks.get("student_logits"), axis_name=axis_name)
    return terms

  def _embedding(self, feats, role, masks):
    """The `embed` tap of `role` as [B, D]: a sequence tap ([B, L, D], e.g.
    a language model's hidden states) is averaged over its valid positions
    (the role's hidden mask when it is the hidden tap)."""
    name = self.taps[f"{role}_embed"]
    x = feats[name]
    if x.ndim == 2:
      return x
    mask = masks.get(f"{role}_hidden") if name == self.taps[
        f"{role}_hidden"] else None
    w = jnp.ones(x.shape[:2], x.dtype) if mask is None else mask.astype(
        x.dtype)
    return jnp.einsum("bl,bld->bd", w, x) / jnp.maximum(
        jnp.sum(w, axis=1, keepdims=True), 1.0)

  def _relation(self, aligned, s_feats, t_feats, masks, axis_name):
    """L_rel = (1 − ρ)·L_rel(Ĥ_t, H_s) + ρ·L_rel across the batch's records.

    The across-records part compares the B×B geometry of the two models'
    `embed` taps. `relation_batch_form` "cosine": relation_loss on [1, B, D]
    (distances and cosines), centred on the batch mean so that the cosine
    structure is that of the records' deviations (pooled post-GELU features
    share one positive direction that dominates raw cosines). "angle": the
    distance and triplet-angle potentials of RKD (relation.rkd_loss), the
    cosine of the angle at every record of the batch rather than only at
    its mean. Both forms relate the records of the global batch (rows
    gathered over `axis_name`).
    """
    rho, tap = self.relation_batch_share, self.taps
    loss = 0.0
    if rho < 1:
      loss = (1 - rho) * relation.relation_loss(aligned, s_feats[
          tap["student_hidden"]], mask=masks.get("student_hidden"))
    if rho > 0:
      t, s = (self._embedding(f, role, masks)
              for f, role in ((t_feats, "teacher"), (s_feats, "student")))
      if self.relation_batch_form == "angle":
        batch = relation.rkd_loss(t, s, axis_name=axis_name)
      else:
        t, s = (_ops.global_rows(x, axis_name) for x in (t, s))
        centred = lambda x: (x - jnp.mean(x, axis=0))[None]
        batch = relation.relation_loss(centred(t), centred(s))
      loss = loss + rho * batch
    return loss

  def _teacher_view(self, teacher_out, masks, axis_name=None):
    """(teacher_out, masks) with the teacher's side rolled by `teacher_shift`
    records of the global batch: the control reads another record's
    teacher, consistently, whatever the rows per device."""
    if not self.teacher_shift:
      return teacher_out, masks
    roll = lambda x: _ops.global_roll(x, self.teacher_shift, axis_name)
    return jax.tree.map(roll, teacher_out), {
        k: roll(v) if k.startswith("teacher") and v is not None else v
        for k, v in masks.items()}

  def inspect(self, head_params, student_out, teacher_out, masks=None):
    """What the EVL terms see, for diagnostics (no gradient).

    Returns {"aligned": Ĥ_t, "attention": [B, H, M, N] MHCA weights} when
    the aligner is on and {"ot_plans": [B, N, M], "ot_iterations": [B]
    (Sinkhorn's, teacher-to-student)} when L_ot is.
    """
    (_, s_feats), (_, t_feats) = jax.lax.stop_gradient(
        (student_out, teacher_out))
    (_, t_feats), masks = self._teacher_view((None, t_feats), masks or {})
    out = {}
    if self.heads is None:
      return out
    head, inter = self.heads.apply(
        {"params": head_params}, s_feats, t_feats, masks,
        mutable=["intermediates"])
    if "aligned" in head:
      out["aligned"] = head["aligned"]
      out["attention"] = inter["intermediates"]["aligner"]["align"][
          "attention_weights"][0]
    if "ot_student" in head:
      out["ot_plans"], out["ot_iterations"] = ot.transport_plans(
          unit_tokens(t_feats[self.taps["teacher_ot"]]),
          unit_tokens(head["ot_student"]),
          teacher_mask=masks.get("teacher_ot"),
          student_mask=masks.get("student_ot"), with_iterations=True,
          **self.ot_kwargs)
    return jax.lax.stop_gradient(out)

  def combine(self, task_loss, head_params, student_out, teacher_out, *,
              labels=None, label_mask=None, masks=None, axis_name=None):
    """(L, terms): Eq. 9 around `task_loss`, the distillation terms only
    when α > 0 (`axis_name`: see `distill_terms`)."""
    distill = {}
    if self.alpha > 0:
      distill = self.distill_terms(head_params, student_out, teacher_out,
                                   labels, label_mask, masks,
                                   axis_name=axis_name)
    total = evl_loss(task_loss, distill, alpha=self.alpha,
                     weights=self.term_weights)
    return total, {"ce": task_loss, **distill}

  def __call__(self, head_params, student_out, teacher_out, labels,
               label_mask=None, *, axis_name=None):
    ce = task.sigmoid_bce_loss(student_out[0], labels, mask=label_mask,
                               axis_name=axis_name)
    return self.combine(ce, head_params, student_out, teacher_out,
                        labels=labels, label_mask=label_mask,
                        axis_name=axis_name)


def make_objective(*, alpha: float, kd_weight: float = 0.0,
                   mhca_weight: float = 0.0, relation_weight: float = 0.0,
                   ot_weight: float = 0.0, fitnet_weight: float = 0.0,
                   tinybert_weight: float = 0.0, rkd_weight: float = 0.0,
                   dkd_weight: float = 0.0, uld_weight: float = 0.0,
                   kd_temperature: float = 1.0,
                   student_hidden_tap: str = "tokens",
                   teacher_hidden_tap: str = "tokens",
                   student_ot_tap: str = "tokens",
                   teacher_ot_tap: str = "tokens",
                   student_embed_tap: str = "pooled",
                   teacher_embed_tap: str = "pooled",
                   tinybert_layer_map=(), mhca_heads: int = 4,
                   mhca_qkv_features: Optional[int] = None,
                   mhca_reconstruction_weight: float = 1.0,
                   mhca_time_sigma: float = 0.0, mhca_temperature: float = 1.0,
                   mhca_projection: bool = False,
                   relation_batch_share: float = 0.0,
                   relation_batch_form: str = "cosine",
                   shuffle_teacher: bool = False,
                   dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
                   ot_epsilon: float = 0.1, ot_plan_gradient: str = "implicit",
                   ot_threshold: float = 1e-3,
                   ot_max_iterations: int = 1000, ot_time_weight: float = 0.0,
                   ot_relative_epsilon: bool = False,
                   ot_debiased: bool = False,
                   ot_teacher_self_term: bool = True,
                   ot_inner_iterations: int = 10,
                   ot_momentum: float = 1.0) -> Objective:
  """Builds the objective L (EVL-ECG Eq. 9) from floats (never a config).

  α = 0 gives the task loss alone (no teacher, no heads). `*_weight` are the
  λ_k of TERMS; a zero weight switches its term off. `mhca_qkv_features` 0
  or None means the student width. The `*_tap` arguments name the feature
  tap each term reads (models.layers.Taps); `tinybert_layer_map` pairs
  (student tap, teacher tap), default: the hidden taps.
  """
  if relation_batch_form not in ("cosine", "angle"):
    raise ValueError(f"relation_batch_form={relation_batch_form!r}: expected "
                     "'cosine' or 'angle'.")
  given = dict(kd=kd_weight, mhca=mhca_weight, relation=relation_weight,
               ot=ot_weight, fitnet=fitnet_weight, tinybert=tinybert_weight,
               rkd=rkd_weight, dkd=dkd_weight, uld=uld_weight)
  weights = {} if alpha == 0 else {k: float(v) for k, v in given.items() if v}
  taps = dict(student_hidden=student_hidden_tap,
              teacher_hidden=teacher_hidden_tap, student_ot=student_ot_tap,
              teacher_ot=teacher_ot_tap, student_embed=student_embed_tap,
              teacher_embed=teacher_embed_tap)
  layer_map = ()
  if "tinybert" in weights:
    layer_map = tuple(tuple(p) for p in tinybert_layer_map) or (
        (student_hidden_tap, teacher_hidden_tap),)
  sequence_relation = "relation" in weights and relation_batch_share < 1
  on = dict(aligner="mhca" in weights or sequence_relation,
            ot_projection="ot" in weights, fitnet="fitnet" in weights)
  heads = None
  if any(on.values()) or layer_map:
    heads = DistillHeads(taps=tuple(taps.items()), tinybert_layer_map=layer_map,
                         mhca_heads=mhca_heads,
                         mhca_qkv_features=mhca_qkv_features or None,
                         mhca_time_sigma=float(mhca_time_sigma),
                         mhca_temperature=float(mhca_temperature),
                         mhca_projection=bool(mhca_projection), **on)
  return Objective(
      alpha=float(alpha), weights=weights, heads=heads, taps=taps,
      kd_temperature=float(kd_temperature),
      mhca_reconstruction_weight=float(mhca_reconstruction_weight),
      dkd_alpha=float(dkd_alpha), dkd_beta=float(dkd_beta),
      relation_batch_share=float(relation_batch_share),
      relation_batch_form=relation_batch_form,
      teacher_shift=int(bool(shuffle_teacher)),
      ot_kwargs=dict(epsilon=float(ot_epsilon), plan_gradient=ot_plan_gradient,
                     threshold=float(ot_threshold),
                     max_iterations=int(ot_max_iterations),
                     time_weight=float(ot_time_weight),
                     relative_epsilon=bool(ot_relative_epsilon),
                     debiased=bool(ot_debiased),
                     teacher_self_term=bool(ot_teacher_self_term),
                     inner_iterations=int(ot_inner_iterations),
                     momentum=float(ot_momentum)))
