"""Logical axis annotations -> mesh shardings on a data x fsdp x tensor mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import family_params
from configs import default
from evl_ecg_jax import models
from evl_ecg_jax import parallel

FAMILIES = sorted(models.MODELS)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  return parallel.make_mesh(("data", "fsdp", "tensor"), (2, 2, 2))


def _model(family, size="tiny"):
  cfg = default.get_config(f"size={size},teacher={family},model={family}")
  return models.get(cfg.student, 5), cfg.sharding.rules


@pytest.mark.parametrize("family", FAMILIES)
def test_rules_resolve_to_valid_partition_specs(family, mesh):
  model, rules = _model(family)
  abstract = models.abstract_variables(model, (4, 1000, 12))
  shardings, _ = parallel.param_shardings(abstract, mesh, rules)
  shapes = nn.meta.unbox(abstract)
  sharded = 0
  for (path, s), x in zip(jax.tree_util.tree_leaves_with_path(shardings),
                          jax.tree.leaves(shapes)):
    assert isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh
    used = [a for axes in s.spec if axes is not None
            for a in ((axes,) if isinstance(axes, str) else axes)]
    assert len(used) == len(set(used)), (path, s.spec)
    assert set(used) <= {"data", "fsdp", "tensor"}
    # Valid: JAX accepts it for this shape (raises otherwise).
    assert s.shard_shape(x.shape)
    sharded += bool(used)
  assert sharded >= len(jax.tree.leaves(shapes)) // 4


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_sharded_forward_equals_unsharded(family, mesh):
  model, rules = _model(family)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 1000, 12)),
                  jnp.float32)
  variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x))
  ref_logits, ref = model.apply(variables, x, taps=("tokens", "stem")
                                if family != "vit1d" else ("tokens", "embed"))
  shardings, _ = parallel.param_shardings(
      models.abstract_variables(model, x.shape), mesh, rules)
  placed = jax.device_put(variables, shardings)
  kernels = [v for v in jax.tree.leaves(placed) if v.ndim >= 2]
  assert any(v.addressable_shards[0].data.size < v.size for v in kernels)
  xs = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits, out = jax.jit(lambda v, e: model.apply(
        v, e, taps=tuple(ref)))(placed, xs)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  for tap in ref:
    np.testing.assert_allclose(out[tap], ref[tap], rtol=1e-4, atol=1e-4)
  # The activations follow the rules: tokens split over batch.
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")


def test_large_preset_shards_every_big_kernel(mesh):
  """On ViT-base every matrix is split (no fallback to replication)."""
  model, rules = _model("vit1d", "base")
  shardings, fallbacks = parallel.param_shardings(
      models.abstract_variables(model, (4, 1000, 12)), mesh, rules)
  assert fallbacks == []
  attn = shardings["params"]["block0"]["attn"]["query"]["kernel"]
  mlp = shardings["params"]["block0"]["mlp"]["fc1"]["kernel"]
  assert attn.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert mlp.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match="mesh_shape=\\(3, -1, 1\\)"):
    parallel.make_mesh(("data", "fsdp", "tensor"), (3, -1, 1))
  with pytest.raises(ValueError, match=r"\(2, 2, 1\).*product is the 8"):
    parallel.make_mesh(("data", "fsdp", "tensor"), (2, 2, 1))
  assert parallel.make_mesh(("data", "fsdp", "tensor"),
                            (-1, 2, 1)).shape["data"] == 4
