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
    ("loss.relation_batch_form", "triplet",
     r"config.loss.relation_batch_form='triplet'.*'cosine' or 'angle'"),
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
  block, key = field.rsplit(".", 1) if "." in field else (None, field)
  (config[block] if block else config)[key] = value
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
