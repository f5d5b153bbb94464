"""ECG VLM: taps, visual token counts, presets, generation and sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import parallel
from evl_ecg_jax.models import vlm

VOCAB, B, L = 64, 4, 5
# The default rules map the decoder's "vocab" and "kv_heads" too.
RULES = tuple(default.get_config("").sharding.rules)
assert {"vocab", "kv_heads"} <= {name for name, _ in RULES}


def _inputs(channels=1, size=64, seed=0):
  rng = np.random.default_rng(seed)
  image = jnp.asarray(rng.uniform(size=(B, size, size, channels)),
                      jnp.float32)
  return image, jnp.asarray(rng.integers(1, VOCAB, (B, L)), jnp.int32)


def _init(model, image, tokens):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), image, tokens))


@pytest.fixture(scope="module")
def teacher():
  model = vlm.build("tiny_teacher", VOCAB)
  return model, _init(model, *_inputs())


@pytest.mark.parametrize("dtype,channels", [(jnp.float32, 1),
                                            (jnp.bfloat16, 3)])
def test_forward_shapes_dtypes_and_taps(dtype, channels):
  model = vlm.build("tiny_teacher", VOCAB, dtype=dtype)
  image, tokens = _inputs(channels)
  variables = _init(model, image, tokens)
  logits, taps = jax.jit(lambda v: model.apply(v, image, tokens, taps=None))(
      variables)
  assert logits.shape == (B, L, VOCAB) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  assert sorted(taps) == ["block0", "block1", "hidden", "projected",
                          "visual"]
  assert taps["visual"].shape == (B, 16, 64)  # 64x64 image, patch 16.
  assert taps["projected"].shape == (B, 16, 96)
  assert taps["hidden"].shape == taps["block1"].shape == (B, L, 96)
  assert all(x.dtype == dtype for x in taps.values())
  visual, projected = model.apply(variables, image,
                                  method=vlm.ECGVLM.encode_image)
  np.testing.assert_allclose(projected.astype(jnp.float32),
                             taps["projected"].astype(jnp.float32),
                             **(dict(rtol=2e-2, atol=5e-2)
                                if dtype == jnp.bfloat16 else dict(atol=1e-5)))
  assert visual.shape == taps["visual"].shape


@pytest.mark.parametrize("preset,overrides,tokens", [
    ("tiny_teacher", {}, 256), ("tiny_student", {}, 64),
    ("tiny_teacher", {"pool": 2}, 64)])
def test_visual_tokens_of_a_256_pixel_printout(preset, overrides, tokens):
  model = vlm.build(preset, VOCAB, **overrides)
  image = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  text = jax.ShapeDtypeStruct((1, L), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, text)
  _, taps = jax.eval_shape(lambda v, x, t: model.apply(
      v, x, t, taps=("visual", "projected")), variables, image, text)
  assert taps["visual"].shape == (1, tokens, model.vit_width)
  assert taps["projected"].shape == (1, tokens, model.lm_width)
  assert vlm.visual_tokens(model, (256, 256)) == tokens


@pytest.mark.parametrize("preset,target", [("vlm_2b", 2e9), ("vlm_7b", 7e9)])
def test_paper_scale_parameter_counts(preset, target):
  """eval_shape only (32k vocabulary, 256 x 256 RGB image)."""
  model = vlm.build(preset, 32000)
  variables = jax.eval_shape(
      model.init, jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
      jax.ShapeDtypeStruct((1, 8), jnp.int32))
  n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables)))
  assert abs(n - target) <= 0.1 * target, f"{preset}: {n:,}"
  assert model.remat and model.dtype == jnp.bfloat16
  assert vlm.visual_tokens(model, (256, 256)) == 256


def test_unknown_preset():
  with pytest.raises(ValueError, match="tiny_student"):
    vlm.build("huge", VOCAB)


def test_gradients_are_finite_and_reach_the_image_encoder():
  model = vlm.build("tiny_student", VOCAB)
  image, tokens = _inputs()
  params = _init(model, image, tokens)["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, image, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["vit"]["embed"]["kernel"]).max() > 0
  assert np.abs(grads["lm"]["embedding"]).max() > 0


def test_cached_generation_with_image_prefix_equals_no_cache(teacher):
  model, variables = teacher
  # Larger token embeddings than at init, so that the text (not only the
  # image) steers the greedy choices.
  variables = jax.tree.map(lambda x: x, variables)
  variables["params"]["lm"]["embedding"] *= 30.0
  image, tokens = _inputs(seed=1)
  kw = dict(max_new_tokens=4, return_logits=True)
  cached = vlm.generate(model, variables["params"], image, tokens, **kw)
  ref = vlm.generate(model, variables["params"], image, tokens,
                     use_cache=False, **kw)
  np.testing.assert_array_equal(cached["tokens"], ref["tokens"])
  np.testing.assert_allclose(cached["logits"], ref["logits"], atol=1e-4)
  # The first step reads the full forward's logits at the last prompt slot.
  logits, _ = model.apply(variables, image, tokens)
  np.testing.assert_allclose(cached["logits"][:, 0], logits[:, -1],
                             atol=1e-4)
  assert len(set(map(tuple, np.asarray(cached["tokens"])))) > 1


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  return parallel.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))


def test_params_get_valid_partition_specs(teacher, mesh):
  model, _ = teacher
  image, tokens = _inputs()
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, tokens)
  shardings, fallbacks = parallel.param_shardings(abstract, mesh, RULES)
  assert fallbacks == []
  leaves = jax.tree.leaves(nn.meta.unbox(abstract))
  specs = jax.tree.leaves(shardings)
  assert len(specs) == len(leaves)
  for s, x in zip(specs, leaves):
    used = [a for axes in s.spec if axes is not None
            for a in ((axes,) if isinstance(axes, str) else axes)]
    assert len(used) == len(set(used)) and set(used) <= set(mesh.shape)
    assert s.shard_shape(x.shape)
  lm = shardings["params"]["lm"]
  P = jax.sharding.PartitionSpec
  assert lm["embedding"].spec == P("tensor", "fsdp")
  assert lm["block0"]["query"]["kernel"].spec == P("fsdp", "tensor")
  assert lm["block0"]["key"]["kernel"].spec == P("fsdp", "tensor")
  assert lm["block0"]["down"]["kernel"].spec == P("tensor", "fsdp")
  assert sum(bool(s.spec) and any(s.spec) for s in specs) >= len(specs) // 2


def test_sharded_forward_equals_unsharded(teacher, mesh):
  model, variables = teacher
  image, tokens = _inputs(seed=2)
  taps = ("hidden", "visual", "projected")
  ref_logits, ref = model.apply(variables, image, tokens, taps=taps)
  shardings, _ = parallel.param_shardings(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), image, tokens),
      mesh, RULES)
  placed = jax.device_put(variables, shardings)
  rows = parallel.batch_sharding(mesh, RULES)
  with parallel.mesh_context(mesh, RULES):
    logits, out = jax.jit(lambda v, x, t: model.apply(v, x, t, taps=taps))(
        placed, jax.device_put(image, rows), jax.device_put(tokens, rows))
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  for tap in taps:
    np.testing.assert_allclose(out[tap], ref[tap], rtol=1e-4, atol=1e-4)
  assert out["hidden"].sharding.spec[0] == ("data", "fsdp")
