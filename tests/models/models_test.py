"""Teacher/student encoders: token counts, output contract, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import models


@pytest.mark.parametrize("block,tokens,width", [("teacher", 240, 64),
                                                ("student", 63, 48)])
def test_tiny_presets_token_counts(block, tokens, width):
  model = models.get(default.get_config("size=tiny")[block], num_classes=5)
  (logits, out), _ = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0),
                                     jnp.zeros((2, 1000, 12))))
  assert logits.shape == (2, 5)
  assert out["tokens"].shape == (2, tokens, width)
  assert out["pooled"].shape == (2, width)


def test_teacher_and_student_are_heterogeneous():
  config = default.get_config("size=tiny")
  teacher = models.get(config.teacher, 5)
  student = models.get(config.student, 5)
  assert type(teacher) is not type(student)


@pytest.mark.parametrize("name", ["vit1d", "cnn1d"])
def test_bf16_compute_keeps_f32_params_and_logits(name):
  cfg = dict(default.get_config("size=tiny")[
      "teacher" if name == "vit1d" else "student"])
  model = models.get({**cfg, "patch_size": 25} if name == "vit1d" else cfg, 5)
  model = model.clone(dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 200, 12)),
                  jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, out = model.apply(variables, x)
  assert out["tokens"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_patch_size_must_divide_samples():
  model = models.get({**default.get_config("size=tiny").teacher,
                      "patch_size": 30}, 5)
  with pytest.raises(ValueError, match="not divisible by patch_size=30"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1000, 12)))


def test_unknown_model_name():
  with pytest.raises(ValueError, match="Unknown model 'nope'"):
    models.get({"name": "nope"}, 5)
