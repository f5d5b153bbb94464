"""`config.parallel`: how the one per-device step runs and where state lives.

  pmap  the step under `jax.pmap` over each process's local devices;
        params, optimizer state and the frozen teacher replicated;
        gradients `pmean`ed over the named axis "data".
  spmd  the same step under `jit` (axis_name=None) on a `data x fsdp x
        tensor` mesh (`config.sharding`): params, optimizer state and the
        frozen teacher sharded by the models' logical axes (FSDP / tensor
        parallel), the batch split over the "batch" rule's mesh axes.
  shard_map  pmap's step (its named-axis collectives: gradients `pmean`ed
        over "data") under `jit` + `jax.shard_map` on the config's mesh,
        which must be data-parallel only (fsdp = tensor = 1): state and
        teacher replicated, the batch split over "data". Placement,
        prediction and diagnostics are spmd's.

All give the same losses and updates (tests/train/parallel_modes_test.py).
A runner owns placement only: init, restore targets, batches, prediction.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from evl_ecg_jax import config as config_lib
from evl_ecg_jax import parallel


class Pmap:
  """Replicated state; batches [B_process, ...] -> [local devices, b, ...]."""

  name = "pmap"

  def __init__(self):
    self.batch_shards = jax.device_count()

  def init_state(self, init_fn, rng, target=None):
    """`init_fn(rng)` -> boxed TrainState; placed replicated."""
    del target
    return parallel.replicate(jax.jit(
        lambda r: nn.meta.unbox(init_fn(r)))(rng))

  def state_target(self, abstract_boxed_state):
    """What a checkpoint restores into (replicated over every process's
    devices in a multi-process run)."""
    sharding = parallel.global_replicated_sharding()
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nn.meta.unbox(abstract_boxed_state))

  def place_state(self, state):
    return parallel.local_replicated(state)

  def checkpointable(self, state):
    """Process-local replicas -> arrays orbax can save from every process."""
    return parallel.global_replicated(state)

  def place_params(self, params, abstract_variables=None):
    """Model params (a frozen teacher, an evaluated model), replicated."""
    del abstract_variables
    return parallel.replicate(params)

  def train_step(self, step_fn, state_like=None, teacher_abstract=None):
    """`step_fn(state, teacher_params, batch, axis_name)` under pmap."""
    del state_like, teacher_abstract
    return parallel.pmap_train_step(functools.partial(step_fn,
                                                      axis_name=parallel.AXIS))

  def put_batch(self, batch):
    return parallel.split_batch(batch, jax.local_device_count())

  def predictor(self, predict_fn):
    """(params, full host batch) -> host outputs, on every process."""
    p_predict = parallel.pmap_predict(predict_fn)
    return lambda params, batch: parallel.merge_outputs(p_predict(
        params, parallel.split_batch(batch, jax.local_device_count())))

  def diagnoser(self, diagnose_fn):
    """`diagnose_fn(params, teacher_params, batch) -> {name: scalar}` on
    this process's whole training batch -> {name: float}.

    One program on the first local device, not one per device: the
    diagnostics are batch statistics (CKA, gradient shares and cosines, the
    shuffled teacher), which per-device values averaged would not give.
    In a multi-process run each process reads its own rows.
    """
    fn = jax.jit(diagnose_fn)
    first = lambda tree: jax.tree.map(
        lambda x: x.addressable_shards[0].data if isinstance(x, jax.Array)
        else x, tree)
    return lambda params, teacher_params, batch: _host_means(fn(
        first(params), first(teacher_params), batch))


class Spmd:
  """Sharded state on `mesh`; batches become global jax.Arrays."""

  name = "spmd"

  def __init__(self, mesh, rules, compiler_options=None):
    self.mesh, self.rules = mesh, rules
    self.compiler_options = compiler_options  # of the train step's jit
    self.batch_shards = parallel.batch_shards(mesh, rules)
    self._batch = parallel.batch_sharding(mesh, rules)

  def shardings(self, abstract_boxed):
    """NamedShardings of a boxed abstract tree (logged fallbacks)."""
    return parallel.param_shardings(abstract_boxed, self.mesh, self.rules)[0]

  def init_state(self, init_fn, rng, target=None):
    """`init_fn(rng)` -> boxed TrainState, created sharded like `target`
    (`state_target` of its abstract value when None)."""
    if target is None:
      target = self.state_target(jax.eval_shape(init_fn, rng))
    with parallel.mesh_context(self.mesh, self.rules):
      return jax.jit(lambda r: nn.meta.unbox(init_fn(r)),
                     out_shardings=_shardings_of(target))(rng)

  def state_target(self, abstract_boxed_state):
    """ShapeDtypeStructs carrying the shardings of the boxes' logical axes:
    what a checkpoint restores into, what `init_state` creates and what
    `train_step` is compiled for."""
    return _with_shardings(abstract_boxed_state,
                           self.shardings(abstract_boxed_state))

  def place_state(self, state):
    return state  # restored in place (state_target carries the shardings)

  def checkpointable(self, state):
    return state

  def place_params(self, params, abstract_variables):
    """Model params (a frozen teacher: no optimizer state) sharded by their
    logical axes; `params` are host arrays every process holds."""
    return parallel.same_on_every_process(
        params, self.shardings(abstract_variables)["params"])

  def teacher_target(self, abstract_variables):
    """The frozen teacher's params as sharded ShapeDtypeStructs (None
    without a teacher)."""
    if abstract_variables is None:
      return None
    return _with_shardings(abstract_variables["params"],
                           self.shardings(abstract_variables)["params"])

  def batch_target(self, shapes):
    """{name: ShapeDtypeStruct} of a global batch, sharded as `put_batch`
    places it."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._batch)
            for k, v in shapes.items()}

  def train_step(self, step_fn, state_like, teacher_abstract=None):
    """`step_fn` under jit on the mesh, for a state sharded like
    `state_like` (the state, or its `state_target`); `.lower(...)` on the
    targets compiles it ahead of time (evl_ecg_jax/aot.py)."""
    return parallel.spmd_train_step(
        step_fn, self.mesh, self.rules, _shardings_of(state_like),
        None if teacher_abstract is None
        else self.shardings(teacher_abstract)["params"],
        compiler_options=self.compiler_options)

  def put_batch(self, batch):
    return parallel.host_local_batch(batch, self._batch)

  def predictor(self, predict_fn):
    """(params placed on the mesh, full host batch) -> host outputs."""
    step = parallel.spmd_predict(predict_fn, self.mesh, self.rules)
    return lambda params, batch: np.asarray(step(
        params, parallel.same_on_every_process(batch, self._batch)))

  def diagnoser(self, diagnose_fn):
    """`diagnose_fn(params, teacher_params, batch) -> {name: scalar}` on the
    global training batch -> {name: float}."""
    step = parallel.spmd_predict(diagnose_fn, self.mesh, self.rules)
    return lambda params, teacher_params, batch: _host_means(step(
        params, teacher_params, self.put_batch(batch)))


class ShardMap(Spmd):
  """Spmd's placement on a data-only mesh; the step under shard_map."""

  name = "shard_map"

  def __init__(self, mesh, rules, compiler_options=None):
    model_axes = {a: n for a, n in mesh.shape.items() if a != parallel.AXIS}
    if any(n != 1 for n in model_axes.values()):
      raise ValueError(
          f"config.sharding.mesh_shape gives {dict(mesh.shape)}: "
          "parallel='shard_map' runs the data-parallel step (state "
          f"replicated), so every axis but {parallel.AXIS!r} must be 1 "
          "(parallel='spmd' shards params).")
    super().__init__(mesh, rules, compiler_options)

  def train_step(self, step_fn, state_like, teacher_abstract=None):
    """`step_fn(..., axis_name="data")` per device under shard_map.

    check_vma is off: ott-jax's Sinkhorn does not type-check under it (see
    `parallel.shard_map_train_step`); the step averages its gradients
    exactly once either way (tests/train/parallel_modes_test.py compares it
    with pmap, spmd and one device).
    """
    del state_like, teacher_abstract
    return parallel.shard_map_train_step(
        functools.partial(step_fn, axis_name=parallel.AXIS), self.mesh,
        check_vma=False, compiler_options=self.compiler_options)


def _with_shardings(abstract_boxed, shardings):
  """The unboxed ShapeDtypeStructs of a boxed abstract tree, each carrying
  its sharding."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(abstract_boxed), shardings)


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _host_means(values) -> dict:
  """{name: float}: each (per-device) value averaged on the host."""
  return {k: float(np.mean(v)) for k, v in jax.device_get(values).items()}


def make(config, devices=None):
  """The runner `config.parallel` names (ValueError naming the field).

  `devices`: the mesh's devices under spmd (default: all of them; the AOT
  tool passes a TPU topology's).
  """
  if config.parallel == "pmap":
    return Pmap()
  if config.parallel in ("spmd", "shard_map"):
    mesh = parallel.make_mesh(config.sharding.mesh_axes,
                              config.sharding.mesh_shape, devices=devices)
    return (Spmd if config.parallel == "spmd" else ShardMap)(
        mesh, config.sharding.rules, config_lib.compiler_options(config))
  raise ValueError(f"config.parallel={config.parallel!r}: expected 'pmap', "
                   "'spmd' or 'shard_map'.")
