"""Teacher/student encoders: token counts, output contract, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import models


@pytest.mark.parametrize("block,tokens,width", [("teacher", 250, 64),
                                                ("student", 63, 32)])
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
  with pytest.raises(ValueError, match="patch_size=30 x lead_groups=1"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1000, 12)))
  model = model.clone(patch_size=4, lead_groups=5)
  with pytest.raises(ValueError, match="lead_groups=5"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1000, 12)))


@pytest.mark.parametrize("groups,tokens", [(1, 250), (2, 500), (12, 3000)])
def test_lead_groups_token_count_and_patch_content(groups, tokens):
  """Token (g, s) must see exactly leads of group g and samples of step s."""
  model = models.ViT1D(num_classes=5, patch_size=4, width=8, depth=0,
                       num_heads=1, mlp_dim=8, lead_groups=groups)
  x = jnp.zeros((1, 1000, 12))
  variables = model.init(jax.random.PRNGKey(0), x)
  _, out = model.apply(variables, x)
  assert out["tokens"].shape == (1, tokens, 8)
  # Perturb one sample of the last lead: only its token may change (depth 0).
  x2 = x.at[0, 9, 11].set(1.0)
  _, out2 = model.apply(variables, x2)
  changed = np.flatnonzero(np.abs(out2["tokens"] - out["tokens"]).sum(-1)[0])
  steps = 1000 // 4
  np.testing.assert_array_equal(changed, [(groups - 1) * steps + 9 // 4])


def test_unknown_model_name():
  with pytest.raises(ValueError, match="Unknown model 'nope'"):
    models.get({"name": "nope"}, 5)
