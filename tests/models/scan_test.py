"""Scanned transformer stacks equal the unrolled ones (ViT1D, image ViT, LM).

The scanned model's params are the unrolled model's, stacked by
`layers.block_layout` (the converter teacher loading and export use); logits,
every per-block tap and the gradients must agree to 1e-5, and the layout
conversion must round-trip exactly.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import parallel
from evl_ecg_jax.models import decoder as decoder_lib
from evl_ecg_jax.models import layers
from evl_ecg_jax.models import vit1d
from evl_ecg_jax.models import vlm

TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(model, *inputs, **kw):
  """(unrolled params, the same params stacked for model.clone(scan=True))."""
  params = nn.meta.unbox(jax.jit(functools.partial(model.init, **kw))(
      jax.random.PRNGKey(0), *inputs))["params"]
  scanned = model.clone(scan=True)
  target = nn.meta.unbox(jax.eval_shape(
      lambda: scanned.init(jax.random.PRNGKey(0), *inputs, **kw)))["params"]
  stacked = layers.block_layout(params, target)
  assert (jax.tree.structure(stacked) == jax.tree.structure(target))
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(target)):
    assert a.shape == b.shape and a.dtype == b.dtype
  return params, scanned, stacked


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), **TOL)


@pytest.mark.parametrize("remat", [False, True])
def test_vit1d_scanned_equals_unrolled(remat):
  model = vit1d.ViT1D(num_classes=5, patch_size=25, width=64, depth=3,
                      num_heads=2, mlp_dim=128, remat=remat)
  ecg = jnp.asarray(np.random.default_rng(0).normal(size=(2, 250, 12)),
                    jnp.float32)
  params, scanned, stacked = _pair(model, ecg)

  @jax.jit
  def outputs(p, p_s):
    return (model.apply({"params": p}, ecg, taps=None),
            scanned.apply({"params": p_s}, ecg, taps=None))
  out, out_s = outputs(params, stacked)
  assert sorted(out[1]) == sorted(out_s[1])  # every block tap is there.
  _close(out, out_s)

  def loss(m, p):
    logits, feats = m.apply({"params": p}, ecg, taps=("block1", "tokens"))
    return (logits ** 2).mean() + feats["block1"].var()
  grads = jax.jit(lambda p, p_s: (jax.grad(functools.partial(loss, model))(p),
                                  jax.grad(functools.partial(loss, scanned))(
                                      p_s)))
  grad, grad_s = grads(params, stacked)
  _close(layers.block_layout(grad, stacked), grad_s)
  # Back to the unrolled layout, bit for bit.
  _close(layers.block_layout(stacked, params), params)


def test_scanned_params_carry_a_layers_axis():
  model = vit1d.ViT1D(num_classes=5, patch_size=25, width=64, depth=2,
                      num_heads=2, mlp_dim=128, scan=True)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((2, 250, 12)))
  specs = nn.get_partition_spec(abstract)["params"]["blocks"]
  assert tuple(specs["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["attn"]["query"]["kernel"]) == ("layers", "embed", "heads")
  mesh = parallel.make_mesh(("data", "fsdp", "tensor"), (1, 1, 1),
                            jax.devices()[:1])
  shardings, _ = parallel.param_shardings(
      abstract, mesh, tuple(default.get_config("").sharding.rules))
  kernel = shardings["params"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel.spec[0] is None  # the layers axis stays whole.


def _decoder(scan=False):
  return decoder_lib.Decoder(vocab_size=48, width=64, depth=3, num_heads=2,
                             num_kv_heads=1, mlp_dim=96, scan=scan)


def test_decoder_scanned_equals_unrolled_with_and_without_cache():
  model = _decoder()
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 48, (2, 6)))
  params, scanned, stacked = _pair(model, tokens)
  both = jax.jit(lambda p, p_s: (
      model.apply({"params": p}, tokens, taps=None),
      scanned.apply({"params": p_s}, tokens, taps=None)))
  _close(*both(params, stacked))
  kw = dict(max_new_tokens=5, return_logits=True)
  gen = decoder_lib.generate(model, params, tokens, **kw)
  gen_s = decoder_lib.generate(scanned, stacked, tokens, **kw)
  np.testing.assert_array_equal(gen["tokens"], gen_s["tokens"])
  _close(gen["logits"], gen_s["logits"])  # the stacked KV cache
  cache = decoder_lib.init_cache(scanned, 2, 8)
  assert cache["layers"]["k"].shape == (3, 2, 8, 1, 32)


def test_vlm_scanned_equals_unrolled():
  model = vlm.build("tiny_teacher", 64)
  rng = np.random.default_rng(2)
  image = jnp.asarray(rng.uniform(size=(2, 64, 64, 1)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 64, (2, 5)), jnp.int32)
  params, scanned, stacked = _pair(model, image, tokens)
  assert set(stacked["vit"]) >= {"blocks"} and "blocks" in stacked["lm"]
  both = jax.jit(lambda p, p_s: (
      model.apply({"params": p}, image, tokens, taps=None),
      scanned.apply({"params": p_s}, image, tokens, taps=None)))
  _close(*both(params, stacked))  # generation: the decoder test above
