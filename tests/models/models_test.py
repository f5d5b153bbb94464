"""Model zoo: every family x tiny trains, token counts, taps, leads, bf16."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import family_params
from configs import default
from evl_ecg_jax import models
from evl_ecg_jax.models import layers

FAMILIES = sorted(models.MODELS)


def _tiny(family, role="student", **overrides):
  cfg = default.get_config(f"size=tiny,teacher={family},model={family}")
  return models.get({**cfg[role], **overrides}, 5)


def _ecg(batch=2, samples=1000, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(
      size=(batch, samples, 12)), jnp.float32)


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_tiny_forward_backward(family):
  """Finite logits, and every parameter tensor gets a finite gradient that is
  non-zero after one SGD step (zero-initialised norms start some at 0)."""
  model = _tiny(family)
  x, labels = _ecg(4), jnp.asarray([[1, 0, 0, 1, 0]] * 4, jnp.float32)
  params = models.init_params(model, jax.random.PRNGKey(0), x[:1])

  def loss(p):
    logits, _ = model.apply({"params": p}, x, train=True,
                            rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.mean(nn.log_sigmoid(logits) * labels
                    + nn.log_sigmoid(-logits) * (1 - labels))

  grad = jax.jit(jax.grad(loss))
  grads = grad(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  grads = grad(params)
  zero = [jax.tree_util.keystr(k) for k, g in
          jax.tree_util.tree_leaves_with_path(grads) if not np.any(g)]
  assert not zero, zero


def _expected_tokens(family: str, fields: dict, samples: int) -> int:
  """Token count the model block `fields` gives for `samples` samples (the
  reference: each family's strides, worked out by hand)."""
  if family == "vit1d":
    return fields.get("lead_groups", 1) * math.ceil(
        samples / fields["patch_size"])
  if family == "cnn1d":
    return math.ceil(samples / 2 ** len(fields["widths"]))
  n = samples
  if family == "xresnet1d":
    strides = [fields["stem_stride"], 2] + [2] * (len(fields["widths"]) - 1)
  else:
    strides = [fields["stem_stride"]] + [2] * (len(fields["widths"]) - 1)
  for s in strides:
    n = math.ceil(n / s)
  return n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role,rate", [("student", 100), ("teacher", 100),
                                       ("student", 500), ("teacher", 500)])
def test_token_counts_follow_the_config(family, role, rate):
  data = "synthetic" if rate == 100 else "synthetic500"
  cfg = default.get_config(f"size=tiny,teacher={family},model={family},"
                           f"data={data}")[role]
  model = models.get(cfg, 5)
  x = jax.ShapeDtypeStruct((2, 10 * rate, 12), jnp.float32)
  _, feats = jax.eval_shape(
      model.apply, models.abstract_variables(model, x.shape), x)
  expected = _expected_tokens(family, dict(cfg), 10 * rate)
  assert feats["tokens"].shape[:2] == (2, expected)
  # ~64 student / ~256 teacher tokens, where the family can give them: CNN1D
  # has a fixed stride (313 tokens at 500 Hz) and the conv families cannot
  # go below stride 8-16 (at most 125 / 63 tokens at 100 Hz).
  if family == "vit1d" or (role == "student" and family != "cnn1d"):
    target = 64 if role == "student" else 256
    assert abs(expected - target) <= 0.03 * target


def test_vit_tokens_see_their_own_patch_and_padding():
  """Token (g, s) sees exactly the leads of group g and samples of step s;
  1000 samples in patches of 16 give ceil(1000 / 16) = 63 tokens."""
  for groups, patch, tokens in [(1, 4, 250), (2, 4, 500), (12, 4, 3000),
                                (1, 16, 63)]:
    model = models.ViT1D(num_classes=5, patch_size=patch, width=8, depth=0,
                         num_heads=1, mlp_dim=8, lead_groups=groups)
    x = jnp.zeros((1, 1000, 12))
    params = models.init_params(model, jax.random.PRNGKey(0), x)
    _, out = model.apply({"params": params}, x)
    assert out["tokens"].shape == (1, tokens, 8)
    _, out2 = model.apply({"params": params}, x.at[0, 999, 11].set(1.0))
    changed = np.flatnonzero(np.abs(out2["tokens"] - out["tokens"]).sum(-1)[0])
    steps = tokens // groups
    np.testing.assert_array_equal(changed, [(groups - 1) * steps + 999 // patch])


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_taps_return_what_was_asked(family):
  model = _tiny(family)
  x = _ecg()
  variables = model.init(jax.random.PRNGKey(0), x)
  names = models.tap_names(model, x.shape)
  assert {"tokens", "pooled"} < set(names) and len(names) >= 4
  middle = next(n for n in names if n not in ("tokens", "pooled"))
  logits, feats = model.apply(variables, x, taps=("tokens", middle))
  assert set(feats) == {"tokens", middle} and logits.shape == (2, 5)
  _, everything = model.apply(variables, x, taps=None)
  assert sorted(everything) == names
  np.testing.assert_array_equal(feats[middle], everything[middle])
  _, none = model.apply(variables, x, taps=())
  assert none == {}
  with pytest.raises(ValueError, match=r"unknown feature tap\(s\) \['nope'\]"
                     r".*'tokens'"):
    model.apply(variables, x, taps=("nope",))


def test_vit_block_taps_are_the_block_outputs():
  model = _tiny("vit1d", role="teacher")
  x = _ecg()
  variables = model.init(jax.random.PRNGKey(0), x)
  _, feats = model.apply(variables, x, taps=("block2", "tokens"))
  # tokens = LayerNorm(last block output), computed here by hand.
  ln = variables["params"]["ln_final"]
  h = feats["block2"]
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  by_hand = (h - mu) / jnp.sqrt(var + 1e-6) * ln["scale"].value + ln[
      "bias"].value
  np.testing.assert_allclose(feats["tokens"], by_hand, atol=1e-5)


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_lead_i_model_reads_only_lead_i(family):
  model = _tiny(family, leads="I")
  x = _ecg(1)
  params = models.init_params(model, jax.random.PRNGKey(0), x)
  apply = lambda e: model.apply({"params": params}, e)[0]
  base = apply(x)
  np.testing.assert_array_equal(apply(x.at[:, :, 1:].set(3.0)), base)
  assert np.abs(apply(x.at[:, :, 0].add(1.0)) - base).max() > 1e-4
  wide = _tiny(family)
  n_lead_i = models.count_params(model, x.shape)
  assert n_lead_i < models.count_params(wide, x.shape)


def test_lead_specs():
  assert layers.lead_indices("all") == tuple(range(12))
  assert layers.lead_indices("limb") == tuple(range(6))
  assert layers.lead_indices("I+II") == (0, 1)
  assert layers.lead_indices("V6") == (11,)
  for bad in ("I+X", "", "I+I"):
    with pytest.raises(ValueError, match="leads="):
      layers.lead_indices(bad)
  with pytest.raises(ValueError, match=r"config.student.leads='II\+V7'.*"
                     r"unknown: \['V7'\]"):
    models.get({**default.get_config("").student, "leads": "II+V7"}, 5,
               field="student")
  with pytest.raises(ValueError, match="lead_groups=2"):
    _tiny("vit1d", role="teacher", leads="I", lead_groups=2).init(
        jax.random.PRNGKey(0), _ecg(1))


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_bf16_compute_keeps_f32_params_and_logits(family):
  model = _tiny(family, dtype="bfloat16")
  x = _ecg(2, 200)
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nn.meta.unbox(variables)))
  logits, out = model.apply(variables, x)
  assert out["tokens"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  # The frozen-teacher setting: bf16 params give the same answer closely.
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                          nn.meta.unbox(variables))
  logits16, _ = model.apply(params16, x)
  np.testing.assert_allclose(logits16, logits, atol=0.1)


def test_bad_model_blocks():
  with pytest.raises(ValueError, match="config.model.name='nope'"):
    models.get({"name": "nope"}, 5)
  with pytest.raises(ValueError, match=r"\['depht'\] are not fields of ViT1D"):
    models.get({**default.get_config("").teacher, "depht": 3}, 5)
  with pytest.raises(ValueError, match="no size '2b'"):
    default.get_config("size=2b")
