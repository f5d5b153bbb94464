"""Runs the per-device steps data-parallel; owns the batch and param layout.

`pmap_*` wrap a per-device function with `jax.pmap` over the local devices:
state and params are broadcast (`in_axes=None`, as flax's imagenet example
does since pmap is built on shard_map), the batch is split on its leading
axis reshaped to [n_devices, b, ...].
`shard_map_train_step` runs the same function under `jit` + `jax.shard_map`
on a mesh whose batch axis is also "data"; there the batch stays
[n_devices * b, ...], sharded on its leading axis.
`make_mesh` / `param_shardings` place params on a `data x fsdp x tensor`
mesh from the models' logical axis names and `config.sharding.rules`.
"""

from __future__ import annotations

import math

from absl import logging
import flax.linen as nn
import jax
import numpy as np

AXIS = "data"


def pmap_train_step(step_fn, devices=None):
  """(state, teacher_params, batch[n_dev, b, ...]) -> (state, metrics)."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(None, None, 0),
                  out_axes=(None, None), donate_argnums=(0,), devices=devices)


def shard_map_train_step(step_fn, mesh, *, check_vma=True):
  """(state, teacher_params, batch[n*b, ...]) -> (state, metrics) on `mesh`.

  With `check_vma` the replication of the outputs is checked: it holds
  because the step `pmean`s its gradients and metrics over "data". ott-jax's
  Sinkhorn (loss terms "ot") does not type-check under it (a `lax.cond` in
  its loop mixes varying and unvarying values), so objectives with OT need
  `check_vma=False`; the step averages its gradients exactly once either way
  (tests/train/step_test.py checks both against pmap).
  """
  replicated, batch = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
      AXIS)
  return jax.jit(jax.shard_map(
      step_fn, mesh=mesh, in_specs=(replicated, replicated, batch),
      out_specs=(replicated, replicated), check_vma=check_vma),
                 donate_argnums=(0,))


def pmap_predict(predict_fn, devices=None):
  """(params, batch[n_dev, b, ...]) -> outputs [n_dev, b, ...]."""
  return jax.pmap(predict_fn, axis_name=AXIS, in_axes=(None, 0),
                  devices=devices)


def replicate(tree, devices=None):
  """Places `tree` once, replicated over `devices` (default: local devices).

  Broadcast (`in_axes=None`) arguments that already carry this sharding are
  not copied again on each call, e.g. the frozen teacher's params.
  """
  devices = jax.local_devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.device_put(tree, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))


def split_batch(batch, num_devices: int):
  """Reshapes host-local arrays [B, ...] -> [num_devices, B // num_devices, ...]."""
  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"Batch of {x.shape[0]} does not split over "
                       f"{num_devices} devices.")
    return np.reshape(x, (num_devices, -1) + x.shape[1:])
  return jax.tree.map(split, batch)


def merge_outputs(x):
  """Inverse of `split_batch` for per-device outputs: [n, b, ...] -> [n*b, ...]."""
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[2:])


def make_mesh(axes, shape, devices=None) -> jax.sharding.Mesh:
  """Mesh with `axes` (e.g. data, fsdp, tensor) of `shape`; -1 = the rest.

  Axes are `AxisType.Auto`: ott-jax's vmapped Sinkhorn does not lower on
  sharded batches with Explicit axes.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = list(shape)
  fixed = math.prod(n for n in shape if n != -1)
  if shape.count(-1) > 1 or len(devices) % fixed:
    raise ValueError(f"config.sharding.mesh_shape={tuple(shape)}: expected "
                     f"at most one -1 and sizes whose product divides the "
                     f"{len(devices)} devices.")
  shape = [len(devices) // fixed if n == -1 else n for n in shape]
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.sharding.mesh_shape={tuple(shape)} uses "
                     f"{math.prod(shape)} of the {len(devices)} devices.")
  return jax.make_mesh(tuple(shape), tuple(axes), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def param_shardings(abstract_variables, mesh, rules):
  """NamedShardings for a tree from `jax.eval_shape(model.init, ...)`.

  Logical axis names (models/layers.py) map to mesh axes by `rules`; a
  dimension that its mesh axes do not divide (a 5-class head, a depthwise
  kernel's single input channel) stays unsharded, and is logged.

  Returns:
    (the unboxed tree of NamedSharding, [(path, logical spec)] left
    unsharded on some dimension).
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_variables),
                             rules)
  shapes = nn.meta.unbox(abstract_variables)
  fallbacks = []

  def fit(path, spec, shape):
    spec = tuple(spec) + (None,) * (len(shape.shape) - len(spec))
    out = []
    for dim, axes in zip(shape.shape, spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(mesh.shape[a] for a in names)
      if names and dim % ways:
        fallbacks.append((jax.tree_util.keystr(path), spec))
        axes = None
      out.append(axes)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))

  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  shardings = jax.tree_util.tree_map_with_path(fit, specs, shapes,
                                               is_leaf=is_spec)
  if fallbacks:
    logging.info("%d params left unsharded on a dimension their mesh axes "
                 "do not divide: %s", len(fallbacks), fallbacks)
  return shardings, fallbacks
