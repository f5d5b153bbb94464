"""Config parsing and validation: errors name the field."""

import pytest

from configs import default
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import models


def _check(config, num_devices=8, has_checkpoint=lambda p: True):
  config_lib.check(config, num_devices=num_devices, model_names=models.MODELS,
                   has_checkpoint=has_checkpoint)


@pytest.mark.parametrize("arg", [
    "mode=train_teacher", "mode=distill,loss=ce", "mode=distill,loss=kd",
    "mode=evaluate", "size=small", "data=synthetic500", "runlocal"])
def test_every_variant_is_valid(arg):
  config = default.get_config(arg)
  if config.mode == "distill":
    config.teacher.init = "/some/teacher"
  _check(config)


def test_parse_arg_is_strict():
  with pytest.raises(config_lib.ConfigError, match="'sise'"):
    default.get_config("sise=tiny")
  with pytest.raises(config_lib.ConfigError, match="runlocal=.*bool"):
    config_lib.parse_arg("runlocal=maybe", runlocal=False)
  with pytest.raises(config_lib.ConfigError, match="loss='xx'"):
    default.get_config("loss=xx")
  assert config_lib.parse_arg("n=3,flag", n=1, flag=False).to_dict() == {
      "n": 3, "flag": True}


@pytest.mark.parametrize("field,value,match", [
    ("data.batch_size", 12, r"config.data.batch_size=12.*multiple of the 8"),
    ("loss.alpha", 1.5, r"config.loss.alpha=1.5.*\[0, 1\]"),
    ("loss.terms.relation.batch_form", "triplet",
     r"config.loss.terms.relation.batch_form='triplet'.*'cosine', 'angle'"),
    ("loss.terms.kd.temperature", 0.0,
     r"config.loss.terms.kd.temperature=0.0.*> 0"),
    ("student.name", "resnet9", r"config.student.name='resnet9'"),
    ("mode", "pretrain", r"config.mode='pretrain'"),
    ("optim.warmup_steps", 10_000, r"config.optim.warmup_steps=10000"),
    ("xla_optimization_level", "O4",
     r"config.xla_optimization_level='O4'.*'O1'"),
    # jax.pmap takes no compiler options (the config's default parallel).
    ("xla_optimization_level", "O1",
     r"config.xla_optimization_level='O1'.*parallel='pmap'"),
])
def test_check_names_the_field(field, value, match):
  config = default.get_config("mode=distill,loss=kd")
  config.teacher.init = "/t"
  config_lib.override(config, {field: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    _check(config)


def test_missing_teacher_checkpoint():
  config = default.get_config("mode=distill,loss=kd")
  with pytest.raises(config_lib.ConfigError, match="config.teacher.init=''"):
    _check(config)
  config.teacher.init = "/nonexistent/teacher"
  with pytest.raises(config_lib.ConfigError,
                     match="no checkpoint|none found.*/nonexistent/teacher"):
    _check(config, has_checkpoint=lambda p: False)
  # Task-loss-only distillation needs no teacher.
  _check(default.get_config("mode=distill,loss=ce"),
         has_checkpoint=lambda p: False)


def _distill(loss, batch_size=16, accum=1, **fields):
  config = default.get_config(f"mode=distill,loss={loss}")
  config.teacher.init = "/t"
  config.data.batch_size, config.grad_accum_steps = batch_size, accum
  for field, value in fields.items():
    block, key = field.split("__")
    config[block][key] = value
  return config


@pytest.mark.parametrize("loss,batch_size,accum,fields,match", [
    # Relations of fewer than 3 records (RKD's angles are triplets).
    ("evl", 8, 4, {}, r"config.data.batch_size=8.*at least 3 records.*"
     r"loss.terms.relation.batch_share.*2 with grad_accum_steps=4"),
    ("rkd", 16, 8, {}, r"at least 3 records.*loss.terms.rkd.weight"),
    # A contrast needs a negative: CRD's and DIST's batch terms.
    ("crd", 8, 8, {}, r"at least 2 records.*loss.terms.crd.weight"),
    # A roll of one record is itself: the control would be EVL.
    ("kd", 8, 8, {"loss__shuffle_teacher": True},
     r"at least 2 records.*loss.shuffle_teacher"),
    # Accumulation of cross-record terms is refused unless named.
    ("evl", 16, 2, {}, r"config.grad_accum_batch_terms='refuse'.*"
     r"'micro_batch'.*loss.terms.relation.batch_share"),
    ("kd", 16, 2, {"data__label_fraction": 0.25},
     r"grad_accum_batch_terms.*data.label_fraction"),
])
def test_check_refuses_inexact_cross_record_terms(loss, batch_size, accum,
                                                  fields, match):
  # One device: on 8, data.batch_size is already a multiple of 8 x accum.
  with pytest.raises(config_lib.ConfigError, match=match):
    _check(_distill(loss, batch_size, accum, **fields), num_devices=1)


def test_cross_record_terms_accumulate_only_when_named():
  _check(_distill("kd", 16, 2))  # means over records: exact
  config = _distill("evl", 16, 2)
  config.grad_accum_batch_terms = "micro_batch"
  _check(config)  # each micro-batch's relations, as named
  config.grad_accum_batch_terms = "whole"
  with pytest.raises(config_lib.ConfigError,
                     match=r"grad_accum_batch_terms='whole'.*'micro_batch'"):
    _check(config)
  # Without a teacher term nothing relates records.
  _check(_distill("ce", 8, 8), num_devices=1)
