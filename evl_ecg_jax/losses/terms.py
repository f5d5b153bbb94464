"""The distillation terms, each one declared part, and their registry.

A part is a frozen dataclass holding one term's hyper-parameters (each
with its one default: the config's `loss.terms.<name>` sections are built
from these fields, configs/default.py), the kinds of feature taps it reads,
its learned heads, its loss (the pure function of its module, called with
the part's settings) and its checks (problems naming the field). TERMS maps
the config names to parts; `objective.Objective` sums the parts that are
on: L = (1 − α)·L_task + α·Σ_k weight_k·L_k (EVL-ECG Eq. 9).

Tap kinds (config `loss.taps` names each model's tap for a kind):
"hidden" (token states [B, N, D]: MHCA, the within-sequence relations,
FitNet), "ot" (visual tokens [B, N, D]: OT) and "embed" (one vector per
record [B, D], or a sequence averaged over its valid positions: the batch
relations, RKD, CRD). A new KD method is one part here, one line of TERMS
and a config variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.losses import _ops
from evl_ecg_jax.losses import contrastive
from evl_ecg_jax.losses import hints
from evl_ecg_jax.losses import kd
from evl_ecg_jax.losses import mhca
from evl_ecg_jax.losses import ot
from evl_ecg_jax.losses import relation
from evl_ecg_jax.losses.evl import unit_tokens

ROLES = ("student", "teacher")
KINDS = ("hidden", "ot", "embed")


@dataclasses.dataclass(frozen=True)
class View:
  """What a term reads: both models' (logits, {tap: hidden}) under the
  objective's taps (teacher side stop-gradient, rolled for the control),
  the learned heads' outputs, the valid-token masks ({role}_{kind} and
  {role}_logits, absent: all valid), the labels and the data axis."""
  student: tuple
  teacher: tuple
  head: dict
  masks: dict
  taps: dict
  labels: Any = None
  label_mask: Any = None
  axis_name: Optional[str] = None

  def logits(self, role):
    return getattr(self, role)[0]

  def feature(self, role, kind):
    return getattr(self, role)[1][self.taps[f"{role}_{kind}"]]

  def mask(self, role, kind):
    return self.masks.get(f"{role}_{kind}")

  @property
  def aligned(self):
    """Ĥ_t of the MHCA aligner, a fixed target for the student."""
    return jax.lax.stop_gradient(self.head["aligned"])

  def embedding(self, role):
    """The `embed` tap of `role` as [B, D]: a sequence tap ([B, L, D], e.g.
    a language model's hidden states) is averaged over its valid positions
    (the role's hidden mask when it is the hidden tap)."""
    x = self.feature(role, "embed")
    if x.ndim == 2:
      return x
    same = self.taps[f"{role}_embed"] == self.taps[f"{role}_hidden"]
    mask = self.mask(role, "hidden") if same else None
    w = jnp.ones(x.shape[:2], x.dtype) if mask is None else mask.astype(
        x.dtype)
    return jnp.einsum("bl,bld->bd", w, x) / jnp.maximum(
        jnp.sum(w, axis=1, keepdims=True), 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Term:
  """A distillation term; subclasses set `name`, `reads` and `loss`.

  `weight` is its λ (0: off, neither computed nor logged).
  """
  name: ClassVar[str] = ""
  reads: ClassVar[tuple] = ()  # tap kinds; see `kinds`
  relates_by: ClassVar[str] = "weight"  # the field that makes it relate
  weight: float = 0.0

  def kinds(self) -> tuple:
    """Tap kinds it reads (`View.feature`); hidden and ot are token taps."""
    return self.reads

  def layer_taps(self, role, taps) -> tuple:
    """Further taps of `role` it reads by name (TinyBERT's layer pairs);
    `taps`: the objective's {role}_{kind} -> tap name."""
    del role, taps
    return ()

  def needs_aligner(self) -> bool:
    """Whether it reads Ĥ_t (`View.aligned`): the MHCA part's aligner."""
    return False

  def records_needed(self) -> int:
    """Records of the global batch it relates (0: each record alone; a
    term relating records is computed over the global batch)."""
    return 0

  def heads(self, s_feats, t_feats, taps, masks) -> dict:
    """Its learned heads' outputs, created inside `objective.DistillHeads`
    (their params live under params["heads"][<head name>])."""
    del s_feats, t_feats, taps, masks
    return {}

  def losses(self, view: View) -> dict:
    """{logged name: unweighted value} (several for a part with a guard)."""
    return {self.name: self.loss(view)}

  def loss(self, view: View):
    raise NotImplementedError

  def problems(self) -> list:
    """[(field, value, expected)] of settings that cannot work."""
    return [("weight", self.weight, "a weight >= 0 (0 switches it off)")
            ] if self.weight < 0 else []


def _to_teacher_width(make, kind, s_feats, t_feats, taps):
  """The student's `kind` tap through the head `make(teacher width)`."""
  width = t_feats[taps[f"teacher_{kind}"]].shape[-1]
  return make(width)(s_feats[taps[f"student_{kind}"]])


def _positive(part, *fields):
  return [(f, getattr(part, f), "a value > 0") for f in fields
          if not getattr(part, f) > 0]


def _one_of(part, field, allowed):
  value = getattr(part, field)
  return [] if value in allowed else [(field, value, f"one of {allowed}")]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KD(Term):
  """Multi-label logit KD (Hinton et al. 2015): `kd.logit_kd_loss`."""
  name: ClassVar[str] = "kd"
  temperature: float = 2.0  # T

  def loss(self, view):
    return kd.logit_kd_loss(view.logits("teacher"), view.logits("student"),
                            temperature=self.temperature)

  def problems(self):
    return super().problems() + _positive(self, "temperature")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MHCA(Term):
  """L_mhca (EVL-ECG): student hidden states H_s against Ĥ_t = MHCA(H_s,
  H_t), `mhca.mhca_loss`. Its aligner also serves the within-sequence
  relations; it learns only from the guard γ·`mhca_reconstruction_loss`
  (logged as "mhca_reconstruction"), computed whenever the aligner is on.
  """
  name: ClassVar[str] = "mhca"
  reads: ClassVar[tuple] = ("hidden",)
  num_heads: int = 2  # attention heads (W^Q, W^K, W^V, W^O)
  qkv_features: int = 0  # 0: the student width
  reconstruction_weight: float = 1.0  # γ, the aligner's anti-collapse term
  # σ of a Gaussian prior on the attention logits over |τ_i − τ_j|
  # (fractions of the record; 0: none, the paper's content-only attention).
  time_sigma: float = 0.0
  temperature: float = 1.0  # τ on the attention logits (1: the paper's)
  projection: bool = False  # L_mhca on a learned map of H_s

  def needs_aligner(self):
    return self.weight > 0

  def align(self, s_feats, t_feats, taps, masks):
    """{"aligned": Ĥ_t, "reconstruction"} of the aligner (head "aligner")."""
    aligned, reconstruction = mhca.MHCAAligner(
        self.num_heads, self.qkv_features or None,
        time_sigma=float(self.time_sigma),
        temperature=float(self.temperature), name="aligner")(
            s_feats[taps["student_hidden"]], t_feats[taps["teacher_hidden"]],
            teacher_mask=masks.get("teacher_hidden"),
            student_mask=masks.get("student_hidden"))
    return {"aligned": aligned, "reconstruction": reconstruction}

  def heads(self, s_feats, t_feats, taps, masks):
    if not (self.weight > 0 and self.projection):
      return {}
    h_s = s_feats[taps["student_hidden"]]
    return {"mhca_student": nn.Dense(h_s.shape[-1],
                                     name="mhca_projection")(h_s)}

  def losses(self, view):
    out = {"mhca_reconstruction": mhca.mhca_reconstruction_loss(
        view.feature("teacher", "hidden"), view.head["reconstruction"],
        mask=view.mask("teacher", "hidden"))}
    if self.weight > 0:
      h_s = view.head.get("mhca_student", view.feature("student", "hidden"))
      out["mhca"] = mhca.mhca_loss(h_s, view.aligned,
                                   mask=view.mask("student", "hidden"))
    return out

  def problems(self):
    return (super().problems() + _positive(self, "num_heads", "temperature")
            + [(f, getattr(self, f), "a value >= 0") for f in
               ("qkv_features", "reconstruction_weight", "time_sigma")
               if getattr(self, f) < 0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Relation(Term):
  """L_rel = (1 − ρ)·relations within a sequence + ρ·relations across the
  global batch's records.

  Within a sequence (the paper): `relation.relation_loss(sg(Ĥ_t), H_s)`,
  distances and cosines of the aligned tokens. Across records, on each
  model's `embed` tap: with `batch_form` "angle" it is RKD's distance and
  triplet-angle potentials (`relation.rkd_loss`, the `rkd` baseline's
  function, at its λ_D = 1, λ_A = 2); with "cosine", `relation_loss` on the
  batch-centred [1, B, D] embeddings (the paper's two relations moved
  across records). Within-sequence relations of Ĥ_t carry no record
  identity (gradient cosine 0.996 with a shuffled teacher); across records
  they do (docs/evl.md). `loss=evl` is ρ = 1, "angle": RKD's potentials.
  """
  name: ClassVar[str] = "relation"
  relates_by: ClassVar[str] = "batch_share"
  batch_share: float = 0.0  # ρ
  batch_form: str = "cosine"  # "cosine" | "angle"

  def kinds(self):
    return ((("hidden",) if self.batch_share < 1 else ())
            + (("embed",) if self.batch_share > 0 else ()))

  def needs_aligner(self):
    return self.weight > 0 and self.batch_share < 1

  def records_needed(self):
    return 3 if self.batch_share > 0 else 0

  def loss(self, view):
    rho, loss = self.batch_share, 0.0
    if rho < 1:
      loss = (1 - rho) * relation.relation_loss(
          view.aligned, view.feature("student", "hidden"),
          mask=view.mask("student", "hidden"))
    if rho > 0:
      t, s = view.embedding("teacher"), view.embedding("student")
      if self.batch_form == "angle":
        batch = relation.rkd_loss(t, s, axis_name=view.axis_name)
      else:
        t, s = (_ops.global_rows(x, view.axis_name) for x in (t, s))
        centred = lambda x: (x - jnp.mean(x, axis=0))[None]
        batch = relation.relation_loss(centred(t), centred(s))
      loss = loss + rho * batch
    return loss

  def problems(self):
    share = [] if 0 <= self.batch_share <= 1 else [
        ("batch_share", self.batch_share, "ρ in [0, 1]")]
    return (super().problems() + share
            + _one_of(self, "batch_form", ("cosine", "angle")))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OT(Term):
  """L_ot (EVL-ECG): entropic OT between the teacher's tokens and the
  student's, projected (learned) to the teacher width, both standardised
  per token at unit norm (C ∈ [0, 4]): `ot.ot_loss` with these settings."""
  name: ClassVar[str] = "ot"
  reads: ClassVar[tuple] = ("ot",)
  epsilon: float = 0.1  # ε: absolute, or × the cost's spread (relative)
  plan_gradient: str = "implicit"  # "implicit" (exact) or "stop"
  threshold: float = 1e-3  # Sinkhorn's marginal-error tolerance
  max_iterations: int = 1000
  time_weight: float = 0.0  # β of ‖x_i − y_j‖² + β(τ_i − τ_j)²
  relative_epsilon: bool = False  # ε × the std of each sequence's costs
  debiased: bool = False  # the Sinkhorn divergence S_ε
  teacher_self_term: bool = True  # with debiased: keep ½OT(t, t)
  inner_iterations: int = 10  # Sinkhorn's error check every k iterations
  momentum: float = 1.0  # over-relaxation ω of the updates (1: plain)

  def settings(self) -> dict:
    """The keyword settings of `ot.ot_loss` / `ot.transport_plans`."""
    solver = ("threshold", "max_iterations", "inner_iterations", "momentum")
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("weight",) + solver}
    return dict(out, solver=ot.Solver.of(*(getattr(self, f)
                                           for f in solver)))

  def heads(self, s_feats, t_feats, taps, masks):
    del masks
    return {"ot_student": _to_teacher_width(
        lambda width: nn.Dense(width, name="ot_projection"), "ot", s_feats,
        t_feats, taps)}

  def _tokens(self, view):
    return (unit_tokens(view.feature("teacher", "ot")),
            unit_tokens(view.head["ot_student"]))

  def loss(self, view):
    return ot.ot_loss(*self._tokens(view),
                      teacher_mask=view.mask("teacher", "ot"),
                      student_mask=view.mask("student", "ot"),
                      **self.settings())

  def plans(self, view):
    """(plans [B, N, M], Sinkhorn iterations [B]) of the loss, for
    diagnostics."""
    return ot.transport_plans(*self._tokens(view),
                              teacher_mask=view.mask("teacher", "ot"),
                              student_mask=view.mask("student", "ot"),
                              with_iterations=True, **self.settings())

  def problems(self):
    return (super().problems()
            + _positive(self, "epsilon", "max_iterations",
                        "inner_iterations", "momentum")
            + _one_of(self, "plan_gradient", ("implicit", "stop"))
            + [(f, getattr(self, f), "a value >= 0 (threshold 0: always "
                "max_iterations)") for f in ("threshold", "time_weight")
               if getattr(self, f) < 0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitNet(Term):
  """FitNets (Romero et al. 2015): MSE between the teacher's hidden tokens,
  average-pooled to the student's length, and the student's through a
  learned regressor (`hints.fitnet_loss`)."""
  name: ClassVar[str] = "fitnet"
  reads: ClassVar[tuple] = ("hidden",)

  def heads(self, s_feats, t_feats, taps, masks):
    del masks
    return {"fitnet": _to_teacher_width(
        lambda width: hints.HintRegressor(width, name="fitnet"), "hidden",
        s_feats, t_feats, taps)}

  def loss(self, view):
    return hint_loss(view.feature("teacher", "hidden"), view.head["fitnet"])


def hint_loss(teacher_tokens, projected_student):
  """FitNet hint MSE after pooling the teacher to the student's length."""
  pooled = _ops.pool_tokens(teacher_tokens, projected_student.shape[1])
  return hints.fitnet_loss(pooled, projected_student)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyBERT(Term):
  """TinyBERT-style hidden-state terms (Jiao et al. 2020): FitNet summed over
  `layer_map` pairs (student tap, teacher tap), one regressor each (its
  attention term needs attention maps a conv student does not have).
  `loss=tinybert` adds logit KD. Empty map: the hidden taps' pair."""
  name: ClassVar[str] = "tinybert"
  layer_map: tuple = ()  # ((student tap, teacher tap), ...)

  def pairs(self, taps):
    return tuple(tuple(p) for p in self.layer_map) or (
        (taps["student_hidden"], taps["teacher_hidden"]),)

  def layer_taps(self, role, taps):
    return tuple(p[role == "teacher"] for p in self.pairs(taps))

  def heads(self, s_feats, t_feats, taps, masks):
    del masks
    return {f"tinybert{i}": hints.HintRegressor(
        t_feats[t_tap].shape[-1], name=f"tinybert{i}")(s_feats[s_tap])
            for i, (s_tap, t_tap) in enumerate(self.pairs(taps))}

  def loss(self, view):
    pairs = self.pairs(view.taps)
    projected = [view.head[f"tinybert{i}"] for i in range(len(pairs))]
    teacher = view.teacher[1]
    return hints.tinybert_loss(
        [_ops.pool_tokens(teacher[t_tap], p.shape[1])
         for (_, t_tap), p in zip(pairs, projected)], projected,
        layer_map=[(i, i) for i in range(len(projected))])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RKD(Term):
  """Relational KD (Park et al. 2019) on the pooled embeddings of the global
  batch: `relation.rkd_loss`."""
  name: ClassVar[str] = "rkd"
  reads: ClassVar[tuple] = ("embed",)
  distance_weight: float = 1.0  # λ_D
  angle_weight: float = 2.0  # λ_A

  def records_needed(self):
    return 3

  def loss(self, view):
    return relation.rkd_loss(view.feature("teacher", "embed"),
                             view.feature("student", "embed"),
                             distance_weight=self.distance_weight,
                             angle_weight=self.angle_weight,
                             axis_name=view.axis_name)

  def problems(self):
    return super().problems() + [
        (f, getattr(self, f), "a weight >= 0") for f in
        ("distance_weight", "angle_weight") if getattr(self, f) < 0]


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class DKD(Term):
  """Decoupled KD (Zhao et al. 2022), `kd.dkd_loss`. Single-label: on a
  multi-label record its target is the positive class the teacher scores
  highest (`dkd_targets`)."""
  name: ClassVar[str] = "dkd"
  alpha: float = 1.0  # TCKD weight
  beta: float = 8.0  # NCKD weight
  temperature: float = 2.0  # T

  def loss(self, view):
    t_logits = view.logits("teacher")
    return kd.dkd_loss(t_logits, view.logits("student"),
                       dkd_targets(view.labels, t_logits, view.label_mask),
                       alpha=self.alpha, beta=self.beta,
                       temperature=self.temperature)

  def problems(self):
    return super().problems() + _positive(self, "temperature")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ULD(Term):
  """Universal Logit Distillation (Boizard et al. 2024), across vocabularies:
  `kd.uld_loss`, a mean over the global batch's paired positions."""
  name: ClassVar[str] = "uld"
  temperature: float = 1.0  # T (the paper's)

  def records_needed(self):
    return 1

  def loss(self, view):
    return kd.uld_loss(view.logits("teacher"), view.logits("student"),
                       temperature=self.temperature,
                       teacher_mask=view.mask("teacher", "logits"),
                       student_mask=view.mask("student", "logits"),
                       axis_name=view.axis_name)

  def problems(self):
    return super().problems() + _positive(self, "temperature")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CRD(Term):
  """Contrastive representation distillation (Tian et al. 2020):
  `contrastive.crd_loss` on both models' embeddings through learned linear
  heads g_S, g_T to `features` dims, the global batch's other records as
  negatives."""
  name: ClassVar[str] = "crd"
  reads: ClassVar[tuple] = ("embed",)
  temperature: float = 0.07  # τ (the paper's NCE temperature)
  features: int = 128  # the common embedding width (the paper's)

  def records_needed(self):
    return 2

  def heads(self, s_feats, t_feats, taps, masks):
    view = View(student=(None, s_feats), teacher=(None, t_feats), head={},
                masks=masks, taps=taps)
    return {f"crd_{role}": nn.Dense(self.features, name=f"crd_{role}")(
        view.embedding(role)) for role in ROLES}

  def loss(self, view):
    return contrastive.crd_loss(view.head["crd_teacher"],
                                view.head["crd_student"],
                                temperature=self.temperature,
                                axis_name=view.axis_name)

  def problems(self):
    return super().problems() + _positive(self, "temperature", "features")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DIST(Term):
  """DIST (Huang et al. 2022): inter- and intra-class Pearson correlations
  of the softmax probabilities, `kd.dist_loss` over the global batch."""
  name: ClassVar[str] = "dist"
  inter_weight: float = 1.0  # β
  intra_weight: float = 1.0  # γ
  temperature: float = 1.0  # τ (the paper's ImageNet value)

  def records_needed(self):
    return 2

  def loss(self, view):
    return kd.dist_loss(view.logits("teacher"), view.logits("student"),
                        inter_weight=self.inter_weight,
                        intra_weight=self.intra_weight,
                        temperature=self.temperature,
                        axis_name=view.axis_name)

  def problems(self):
    return super().problems() + _positive(self, "temperature") + [
        (f, getattr(self, f), "a weight >= 0") for f in
        ("inter_weight", "intra_weight") if getattr(self, f) < 0]


# Config name -> part, in the order the terms are computed and summed.
TERMS = {part.name: part for part in (KD, MHCA, Relation, OT, FitNet,
                                      TinyBERT, RKD, DKD, ULD, CRD, DIST)}


def defaults() -> dict:
  """{term: {field: default}}: the config's `loss.terms` sections."""
  return {name: {f.name: f.default for f in dataclasses.fields(part)}
          for name, part in TERMS.items()}


def build(name: str, settings) -> Term:
  """The part `name` with `settings` ({field: value}, e.g. a config
  section). ValueError naming `loss.terms.<name>.<field>` for an unknown
  term or field, or a setting that cannot work."""
  if name not in TERMS:
    raise ValueError(f"config.loss.terms.{name}: expected a term among "
                     f"{sorted(TERMS)}.")
  fields = {f.name: f for f in dataclasses.fields(TERMS[name])}
  unknown = sorted(set(settings) - set(fields))
  if unknown:
    raise ValueError(f"config.loss.terms.{name}.{unknown[0]}: expected one "
                     f"of the fields {sorted(fields)}.")
  values = {k: _hashable(v, type(fields[k].default))
            for k, v in dict(settings).items()}
  part = TERMS[name](**values)
  for field, value, expected in part.problems():
    raise ValueError(f"config.loss.terms.{name}.{field}={value!r}: expected "
                     f"{expected}.")
  return part


def _hashable(value, kind):
  """Config values as the part's field types (lists -> tuples)."""
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v, None) for v in value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value
