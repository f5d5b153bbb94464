"""The declared parts: one default per hyper-parameter, the registry, the
config sections and the errors that name the field."""

import dataclasses
import inspect

import pytest

from configs import default
from configs import vlm as vlm_config
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import losses
from evl_ecg_jax.losses import contrastive, kd, mhca, ot, relation, terms


def _keyword_defaults(fn):
  return {k: p.default for k, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}


# (pure function, part, {function keyword: part field}) for the settings a
# pure function still has a default for: it must be the part's.
_SHARED = [
    (ot.ot_loss, terms.OT, {k: k for k in (
        "plan_gradient", "time_weight", "relative_epsilon", "debiased",
        "teacher_self_term")}),
    (relation.rkd_loss, terms.RKD, {"distance_weight": "distance_weight",
                                    "angle_weight": "angle_weight"}),
    (kd.dkd_loss, terms.DKD, {"alpha": "alpha", "beta": "beta"}),
    (kd.uld_loss, terms.ULD, {"temperature": "temperature"}),
]


@pytest.mark.parametrize("fn,part,fields", _SHARED,
                         ids=[p.name for _, p, _ in _SHARED])
def test_a_pure_function_default_is_its_part_s(fn, part, fields):
  given = _keyword_defaults(getattr(fn, "__wrapped__", fn))
  assert set(fields) <= set(given)
  for arg, field in fields.items():
    assert given[arg] == getattr(part(), field), (part.name, arg)


def test_the_settings_a_part_owns_have_no_second_default():
  # The ones that disagreed before the parts (issue 37): Sinkhorn's
  # tolerance and cap, the logit temperatures, MHCA's heads.
  assert "solver" not in _keyword_defaults(ot.ot_loss.__wrapped__)
  assert not ot.Solver._field_defaults  # pylint: disable=protected-access
  assert "temperature" not in _keyword_defaults(kd.logit_kd_loss)
  assert "temperature" not in _keyword_defaults(kd.dkd_loss)
  assert "temperature" not in _keyword_defaults(contrastive.crd_loss)
  heads = {f.name: f for f in dataclasses.fields(mhca.MHCAAligner)}
  assert heads["num_heads"].default is dataclasses.MISSING
  aligner = terms.MHCA()
  assert heads["time_sigma"].default == aligner.time_sigma
  assert heads["temperature"].default == aligner.temperature


@pytest.mark.parametrize("get_config", [default.get_config,
                                        vlm_config.get_config])
def test_every_config_section_is_a_part_with_its_fields(get_config):
  sections = get_config("mode=distill").loss.terms
  assert set(sections) == set(terms.TERMS)
  for name, section in sections.items():
    assert set(section) == {f.name for f in dataclasses.fields(
        terms.TERMS[name])}, name
    assert terms.build(name, section).name == name
  # The registry's defaults are the parts' own.
  for name, part in terms.TERMS.items():
    assert terms.build(name, {}) == part()


@pytest.mark.parametrize("name,settings,match", [
    ("sinkhorn", {}, r"config.loss.terms.sinkhorn: expected a term among"),
    ("ot", {"eps": 0.1}, r"config.loss.terms.ot.eps: expected one of the "
     r"fields \[.*'epsilon'"),
    ("ot", {"epsilon": 0.0}, r"config.loss.terms.ot.epsilon=0.0: expected a "
     r"value > 0"),
    ("ot", {"plan_gradient": "unrolled"}, r"terms.ot.plan_gradient="
     r"'unrolled': expected one of \('implicit', 'stop'\)"),
    ("relation", {"batch_share": 1.5}, r"terms.relation.batch_share=1.5"),
    ("kd", {"weight": -1.0}, r"config.loss.terms.kd.weight=-1.0: expected a "
     r"weight >= 0"),
    ("crd", {"features": 0}, r"terms.crd.features=0"),
    ("dist", {"temperature": -1.0}, r"terms.dist.temperature=-1.0"),
])
def test_a_bad_setting_names_its_field(name, settings, match):
  with pytest.raises(ValueError, match=match):
    terms.build(name, settings)
  config = default.get_config("mode=distill,loss=kd")
  if name in config.loss.terms:
    config.loss.terms[name].update(settings)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.objective(config)


def test_variants_compose_parts():
  # A variant switches parts on and sets their fields; the objective
  # holds exactly the parts that are on, in the registry's order.
  on = lambda v: [p.name for p in config_lib.objective(default.get_config(
      f"mode=distill,loss={v}")).parts]
  assert on("ce") == []  # α = 0
  assert on("kd") == ["kd"]
  assert on("tinybert") == ["kd", "tinybert"]
  assert on("crd") == ["crd"] and on("dist") == ["dist"]
  assert on("evl") == ["kd", "mhca", "relation", "ot"]
  assert on("evl_no_mhca") == ["kd", "relation", "ot"]
  evl = config_lib.objective(default.get_config("mode=distill,loss=evl"))
  # What loss=evl's relation term is: RKD's potentials over the batch.
  assert evl.part("relation").batch_form == "angle"
  assert evl.part("relation").batch_share == 1.0
  # The paper's within-sequence relations read MHCA's aligner, at λ_m = 0
  # too: its settings come from the mhca section.
  paper = losses.build_objective(alpha=0.5, terms=dict(
      relation=dict(weight=1.0), mhca=dict(weight=0.0, num_heads=3)))
  assert [p.name for p in paper.parts] == ["mhca", "relation"]
  assert paper.weights == {"relation": 1.0}
  assert paper.part("mhca").num_heads == 3
  assert paper.heads.aligner is not None
