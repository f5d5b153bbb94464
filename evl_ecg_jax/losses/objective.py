"""The distillation objective: EVL-ECG (Eq. 9) and the KD baselines.

    L = (1 − α)·L_task + α·Σ_k λ_k·L_k

over the parts k that are on (`losses.terms`: each term's settings, taps,
heads, loss and checks; TERMS is the registry). EVL-ECG is λ_m, λ_r,
λ_ot > 0 (the paper's sum); each baseline is one part of the same sum
(logit KD, FitNet, TinyBERT-style hints, RKD, DKD, ULD, CRD, DIST), so every
row of a comparison runs through one objective and one train step. A part
whose weight is 0 is neither computed nor logged (that is how ablations
switch terms off).

The teacher is frozen (its outputs under stop_gradient); the parts' learned
heads (the MHCA aligner, OT projection, hint regressors, CRD embeddings)
train with the student under params["heads"]. The task loss reads only
examples whose `label_mask` is True (the labels protocol); every
distillation term uses all examples.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import flax.linen as nn
import jax

from evl_ecg_jax.losses import _ops
from evl_ecg_jax.losses import task
from evl_ecg_jax.losses import terms as terms_lib
from evl_ecg_jax.losses.evl import evl_loss

_DEFAULT_TAPS = dict(student_hidden="tokens", teacher_hidden="tokens",
                     student_ot="tokens", teacher_ot="tokens",
                     student_embed="pooled", teacher_embed="pooled")


class DistillHeads(nn.Module):
  """The learned heads of the parts that are on, trained with the student.

  Called on the student's and the teacher's {tap: hidden}; returns the
  heads' outputs by name: {"aligned", "reconstruction"} of the MHCA aligner
  when a part reads Ĥ_t, then each part's own (`Term.heads`).
  """
  parts: tuple  # the objective's Term parts
  taps: tuple  # (({role}_{kind}, tap name), ...)
  aligner: Optional[terms_lib.MHCA] = None

  @nn.compact
  def __call__(self, s_feats, t_feats, masks=None):
    taps, masks, out = dict(self.taps), masks or {}, {}
    if self.aligner is not None:
      out.update(self.aligner.align(s_feats, t_feats, taps, masks))
    for part in self.parts:
      out.update(part.heads(s_feats, t_feats, taps, masks))
    return out


@dataclasses.dataclass(frozen=True)
class Objective:
  """objective(head_params, student_out, teacher_out, labels[, label_mask])
  -> (total, terms).

  `student_out`/`teacher_out` are a model's `(logits, {tap: hidden})` pair;
  `teacher_out` is only read when α > 0 (it may be None otherwise) and
  `head_params` only when `heads` is not None. `terms` holds every computed
  term, unweighted, for logging. `combine` is the same sum around any task
  loss (e.g. the token CE of a language model, with sequence masks). Built
  by `build`.
  """
  alpha: float
  parts: tuple  # the Term parts that are on, in TERMS order
  taps: dict = dataclasses.field(default_factory=lambda: dict(_DEFAULT_TAPS))
  # Records the teacher outputs (and teacher masks) are rolled by along the
  # batch: 0 reads each record's own teacher; 1 is the shuffled-teacher
  # control (config loss.shuffle_teacher); diagnostics add one more.
  teacher_shift: int = 0

  def part(self, name: str) -> Optional[terms_lib.Term]:
    """The part `name` if it is on, else None."""
    return next((p for p in self.parts if p.name == name), None)

  @property
  def weights(self) -> dict:
    """λ of every distillation term that is on."""
    return {p.name: p.weight for p in self.parts if p.weight > 0}

  @property
  def term_weights(self) -> dict:
    """λ of every logged distillation term, the aligner's guard (γ)
    included."""
    mhca_part = self.part("mhca")
    guard = {} if mhca_part is None else {
        "mhca_reconstruction": mhca_part.reconstruction_weight}
    return dict(self.weights, **guard)

  @property
  def heads(self) -> Optional[DistillHeads]:
    """The learned heads of the parts (None when no part has one). The
    MHCA part is on exactly when a part reads its aligner (`build`)."""
    if all(type(p).heads is terms_lib.Term.heads for p in self.parts):
      return None
    return DistillHeads(self.parts, tuple(self.taps.items()),
                        self.part("mhca"))

  def model_taps(self, role: str) -> tuple[str, ...]:
    """Feature taps this objective reads from `role` ("student"/"teacher"):
    hidden, ot, the named layer taps, embed."""
    kinds = {k for p in self.parts for k in p.kinds()}
    used = [self.taps[f"{role}_{k}"] for k in ("hidden", "ot") if k in kinds]
    for part in self.parts:
      used += part.layer_taps(role, self.taps)
    if "embed" in kinds:
      used.append(self.taps[f"{role}_embed"])
    return tuple(dict.fromkeys(used))

  def init_heads(self, rng, student_feats, teacher_feats):
    """Params of the learned heads (None without heads), from feature shapes
    (one compiled program: op by op took 3.5 s for the EVL heads on CPU)."""
    heads = self.heads
    if heads is None:
      return None
    return jax.jit(heads.init)(rng, student_feats, teacher_feats)["params"]

  def _view(self, head_params, student_out, teacher_out, masks, axis_name,
            labels=None, label_mask=None, mutable=()):
    """(the parts' `terms_lib.View`, the heads' `mutable` collections):
    the teacher side stop-gradient and rolled, the heads applied."""
    teacher_out = jax.lax.stop_gradient(teacher_out)
    teacher_out, masks = self._teacher_view(teacher_out, masks or {},
                                            axis_name)
    heads, head, state = self.heads, {}, {}
    if heads is not None:
      head, state = heads.apply({"params": head_params}, student_out[1],
                                teacher_out[1], masks, mutable=list(mutable))
    return terms_lib.View(student=student_out, teacher=teacher_out,
                          head=head, masks=masks, taps=self.taps,
                          labels=labels, label_mask=label_mask,
                          axis_name=axis_name), state

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
    view, _ = self._view(head_params, student_out, teacher_out, masks,
                         axis_name, labels, label_mask)
    out = {}
    for part in self.parts:
      out.update(part.losses(view))
    return out

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
    if self.heads is None:
      return {}
    view, inter = self._view(head_params, jax.lax.stop_gradient(student_out),
                             teacher_out, masks, None,
                             mutable=("intermediates",))
    out = {}
    if "aligned" in view.head:
      out["aligned"] = view.head["aligned"]
      out["attention"] = inter["intermediates"]["aligner"]["align"][
          "attention_weights"][0]
    if self.part("ot") is not None:
      out["ot_plans"], out["ot_iterations"] = self.part("ot").plans(view)
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


def build(*, alpha: float, terms: Mapping[str, Mapping] = (),
          taps: Mapping[str, str] = (), shuffle_teacher: bool = False
          ) -> Objective:
  """The objective L (EVL-ECG Eq. 9) of a config's `loss` section.

  `terms`: {term: {field: value}} (`terms_lib.TERMS` names the parts and
  their fields; a missing field takes the part's default, a missing term
  is off); `taps`: {role}_{kind} -> feature tap name, over the defaults
  (tokens, pooled); `shuffle_teacher`: the control (teacher outputs rolled
  by one record). α = 0 gives the task loss alone (no teacher, no heads).
  ValueError naming the config field for a term setting that cannot work.
  """
  parts = [terms_lib.build(name, dict(settings))
           for name, settings in dict(terms).items()]
  order = list(terms_lib.TERMS)
  parts = sorted(parts, key=lambda p: order.index(p.name))
  on = [p for p in parts if p.weight > 0] if alpha > 0 else []
  if any(p.needs_aligner() for p in on) and not any(
      p.name == "mhca" for p in on):  # the aligner's settings, at λ_m = 0
    on.append(next((p for p in parts if p.name == "mhca"),
                   terms_lib.MHCA()))
    on.sort(key=lambda p: order.index(p.name))
  unknown = sorted(set(dict(taps)) - set(_DEFAULT_TAPS))
  if unknown:
    raise ValueError(f"config.loss.taps.{unknown[0]}: expected one of "
                     f"{sorted(_DEFAULT_TAPS)}.")
  return Objective(alpha=float(alpha), parts=tuple(on),
                   taps=dict(_DEFAULT_TAPS, **dict(taps)),
                   teacher_shift=int(bool(shuffle_teacher)))
