"""Runs the per-device steps data-parallel; owns the batch and param layout.

`pmap_*` wrap a per-device function with `jax.pmap` over the local devices:
state and params are broadcast (`in_axes=None`, as flax's imagenet example
does since pmap is built on shard_map), the batch is split on its leading
axis reshaped to [n_devices, b, ...].
`shard_map_train_step` runs the same function under `jit` + `jax.shard_map`
on a mesh whose batch axis is also "data"; there the batch stays
[n_devices * b, ...], sharded on its leading axis.
`spmd_train_step` runs it under plain `jit` with `axis_name=None` on a
`data x fsdp x tensor` mesh: params, optimizer state and the frozen teacher
sharded by `param_shardings` (FSDP / tensor parallel from the models'
logical axis names and `config.sharding.rules`), the batch split over
`batch_sharding`, and XLA inserting the collectives.
"""

from __future__ import annotations

import contextlib
import functools
import math

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from evl_ecg_jax import config as config_lib

AXIS = "data"


def pmap_train_step(step_fn, devices=None):
  """(state, teacher_params, batch[n_dev, b, ...]) -> (state, metrics)."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(None, None, 0),
                  out_axes=(None, None), donate_argnums=(0,), devices=devices)


def shard_map_train_step(step_fn, mesh, *, check_vma=True,
                         compiler_options=None):
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
                 donate_argnums=(0,), compiler_options=compiler_options)


def pmap_predict(predict_fn, devices=None):
  """(params, batch[n_dev, b, ...]) -> outputs [n_dev, b, ...]."""
  return jax.pmap(predict_fn, axis_name=AXIS, in_axes=(None, 0),
                  devices=devices)


def _replicated(devices) -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicate(tree, devices=None):
  """Places `tree` once, replicated over `devices` (default: local devices).

  Broadcast (`in_axes=None`) arguments that already carry this sharding are
  not copied again on each call, e.g. the frozen teacher's params.
  """
  devices = jax.local_devices() if devices is None else devices
  return jax.device_put(tree, _replicated(devices))


def _rebuild(tree, sharding):
  """The same per-device buffers under another sharding (no copy)."""
  def rebuild(x):
    if not isinstance(x, jax.Array):
      return x
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [s.data for s in x.addressable_shards])
  return jax.tree.map(rebuild, tree)


def global_replicated_sharding():
  """Where a multi-process pmap run restores its state (None: 1 process)."""
  if jax.process_count() == 1:
    return None
  return _replicated(jax.devices())


def global_replicated(tree):
  """pmap's process-local replicated arrays -> one replicated array over
  every process's devices (what orbax saves in a multi-process run)."""
  if jax.process_count() == 1:
    return tree
  return _rebuild(tree, global_replicated_sharding())


def local_replicated(tree):
  """Inverse of `global_replicated`: this process's devices' copies."""
  if jax.process_count() == 1:
    return replicate(tree)
  return _rebuild(tree, _replicated(jax.local_devices()))


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
  shape = config_lib.mesh_sizes(axes, shape, len(devices))
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


def mesh_context(mesh, rules):
  """The mesh and logical axis rules a sharded trace needs (activation
  constraints in the models read both)."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


def batch_sharding(mesh, rules):
  """Rows split over the mesh axes of the logical "batch" axis."""
  axes = dict(rules).get("batch")
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def batch_shards(mesh, rules) -> int:
  """How many ways the batch is split (the product of its mesh axes)."""
  axes = dict(rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


class SpmdStep:
  """`fn` under `jit` on `mesh`, traced with the mesh and rules in scope.

  `lower(*abstract_args)` is the ahead-of-time entry (evl_ecg_jax/aot.py).
  """

  def __init__(self, fn, mesh, rules, **jit_kwargs):
    self._jit = jax.jit(fn, **jit_kwargs)
    self.mesh, self.rules = mesh, rules

  def __call__(self, *args):
    with mesh_context(self.mesh, self.rules):
      return self._jit(*args)

  def lower(self, *args):
    with mesh_context(self.mesh, self.rules):
      return self._jit.lower(*args)


def spmd_train_step(step_fn, mesh, rules, state_shardings, teacher_shardings,
                    compiler_options=None):
  """(state, teacher_params, global batch) -> (state, metrics) under jit.

  `step_fn` takes `axis_name`; it is called with None (global view). The
  state is donated; metrics come back replicated. `compiler_options`: see
  `config.compiler_options`.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return SpmdStep(
      functools.partial(step_fn, axis_name=None), mesh, rules,
      in_shardings=(state_shardings, teacher_shardings,
                    batch_sharding(mesh, rules)),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,),
      compiler_options=compiler_options)


def spmd_predict(predict_fn, mesh, rules):
  """(placed params, global batch) -> outputs, replicated on every process
  (the inputs keep the shardings they were placed with)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return SpmdStep(predict_fn, mesh, rules, out_shardings=replicated)


def host_local_batch(batch, sharding):
  """This process's rows [B / processes, ...] -> global jax.Arrays [B, ...]."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def same_on_every_process(tree, shardings):
  """Host arrays every process holds in full -> global jax.Arrays.

  `shardings`: one sharding for every leaf, or a tree of them.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda idx: np.asarray(x[idx])), tree, shardings)
