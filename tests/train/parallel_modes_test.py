"""parallel=pmap, spmd and shard_map run the same step to the same numbers.

The runners of train/runner.py (the code `fit` uses) on 8 fake devices:
pmap (replicated), spmd on a data x fsdp x tensor mesh (params, optimizer
state and the frozen teacher sharded), shard_map (pmap's step under jit on
a data-only mesh) and a single device agree on losses and updated params
for the EVL objective; gradient accumulation equals the whole batch.

The EVL parity runs two examples per device (16 on 8 devices), with the
exact (implicit) Sinkhorn gradient: its adjoint is solved by conjugate
gradients (matmuls); the LAPACK eigendecomposition it used before
deadlocked XLA:CPU's multi-device runtime from two examples per device up.
Logit KD is one of its terms, so KD's parity is checked here too. The
tensor axis is covered with logit KD.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import models
from evl_ecg_jax import parallel
from evl_ecg_jax.train import build
from evl_ecg_jax.train import optim
from evl_ecg_jax.train import runner as runner_lib
from evl_ecg_jax.train import step as step_lib

STEPS = 3
BATCH = 16  # two examples per fake device
# threshold 0: Sinkhorn runs exactly max_iterations on every shard, so the
# per-device and global programs do the same iterations.
EVL = {"alpha": 0.5, "terms.kd.weight": 1.0, "terms.mhca.weight": 1.0,
       "terms.relation.weight": 1.0, "terms.ot.weight": 1.0,
       "terms.ot.epsilon": 0.1, "terms.ot.threshold": 0.0,
       "terms.ot.max_iterations": 100}
# The EVL parity steps with plain SGD: a param then moves by lr x its
# gradient, so the gradients' rounding (another reduction order on 8
# devices) stays at rounding level in the params. Adam's normalised step
# turns it into up to a whole step for a coordinate whose gradient is near
# zero (one weight of 1,920 differed by 1.5e-4 after 3 steps with XLA's
# optimisations off).
SGD = optax.sgd(0.1)


def _config(loss=None):
  config = default.get_config("size=tiny,teacher=vit1d,model=cnn1d")
  config.student.dropout = 0.0  # per-device masks would differ, by design
  config.teacher.depth = 1
  config.optim.warmup_steps = 1
  if loss:
    config_lib.override(config.loss, loss)
  return config


def _run(runner, accum_steps=1, loss=None, tx=None):
  config = _config(loss)
  student = models.get(config.student, 5)
  teacher = models.get(config.teacher, 5)
  rng = np.random.default_rng(0)
  ecg = rng.normal(size=(BATCH, 1000, 12)).astype(np.float32)
  labels = (rng.random((BATCH, 5)) < 0.3).astype(np.float32)
  x = jnp.asarray(ecg[:1])
  objective = build.objective(config)
  tx = tx or optim.make(config.optim, total_steps=10)
  init = build.state_initializer(student, tx, config, x, objective, teacher)
  state = runner.init_state(init, jax.random.PRNGKey(0))
  teacher_abstract = models.abstract_variables(teacher, x.shape)
  teacher_params = runner.place_params(
      models.init_params(teacher, jax.random.PRNGKey(1), x), teacher_abstract)
  step = runner.train_step(functools.partial(
      step_lib.train_step, model=student, teacher=teacher,
      objective=objective, tx=tx, accum_steps=accum_steps), state,
                           teacher_abstract)
  history = []
  for _ in range(STEPS):
    state, metrics = step(state, teacher_params,
                          runner.put_batch({"ecg": ecg, "labels": labels}))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history, (state, teacher_params)


def _assert_same(a, b, rtol=1e-4, param_atol=1e-5):
  (params_a, hist_a, _), (params_b, hist_b, _) = a, b
  for m_a, m_b in zip(hist_a, hist_b):
    assert set(m_a) == set(m_b)
    for k in m_a:
      np.testing.assert_allclose(m_b[k], m_a[k], rtol=rtol, atol=1e-5,
                                 err_msg=k)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol,
                                 atol=param_atol), params_b, params_a)


def _spmd(shape=(4, 2, 1), runner=runner_lib.Spmd):
  config = _config()
  mesh = parallel.make_mesh(config.sharding.mesh_axes, shape)
  return runner(mesh, config.sharding.rules)


@pytest.fixture(scope="module")
def single_device():
  mesh = parallel.make_mesh(("data", "fsdp", "tensor"), (1, 1, 1),
                            devices=jax.devices()[:1])
  return _run(runner_lib.Spmd(mesh, _config().sharding.rules), loss=EVL,
              tx=SGD)


def test_pmap_and_spmd_match_one_device_for_evl(single_device):
  assert jax.device_count() == 8
  pmap = _run(runner_lib.Pmap(), loss=EVL, tx=SGD)
  spmd = _run(_spmd(), loss=EVL, tx=SGD)
  # shard_map as a config builds it, with XLA's optimization level in the
  # step's compiler options (XLA:CPU accepts and ignores it; libtpu applies
  # it, tests/aot_test.py): a malformed option would fail this compile.
  config = _config()
  config.parallel, config.xla_optimization_level = "shard_map", "O1"
  config.sharding.mesh_shape = (8, 1, 1)
  shard_map = _run(runner_lib.make(config), loss=EVL, tx=SGD)
  _assert_same(single_device, pmap)
  _assert_same(single_device, spmd)
  _assert_same(single_device, shard_map)
  assert set(single_device[1][0]) >= {"mhca", "relation", "ot", "kd", "ce"}
  assert single_device[1][-1]["loss"] < single_device[1][0]["loss"]


@pytest.mark.slow
def test_tensor_parallel_matches_pmap_for_kd():
  # Tensor-split matmuls sum in another order; Adam's normalised step
  # turns that float noise into ~1e-5 on a few params after 3 steps.
  _assert_same(_run(runner_lib.Pmap()), _run(_spmd((2, 2, 2))),
               param_atol=1e-4)


def test_shard_map_needs_a_data_only_mesh():
  with pytest.raises(ValueError, match=r"config.sharding.mesh_shape .* must "
                     r"be 1"):
    _spmd((4, 2, 1), runner_lib.ShardMap)


def test_spmd_shards_params_optimizer_state_and_teacher():
  runner = _spmd((2, 2, 2))
  _, _, (state, teacher_params) = _run(runner)

  def fraction(x):  # of the array held by one device
    return x.addressable_shards[0].data.size / x.size

  for tree in (state.params["model"], state.opt_state, teacher_params):
    big = [x for x in jax.tree.leaves(tree) if x.size >= 4096]
    assert big and all(fraction(x) <= 0.5 for x in big)
  # FSDP x tensor: the teacher's MLP kernels hold a quarter on each device.
  mlp = teacher_params["block0"]["mlp"]["fc1"]["kernel"]
  assert fraction(mlp) == 0.25
  assert mlp.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("runner", [
    "pmap", pytest.param("spmd", marks=pytest.mark.slow)])
def test_grad_accumulation_equals_the_whole_batch(runner):
  make = runner_lib.Pmap if runner == "pmap" else _spmd
  whole = _run(make())
  # Summation order differs (see the tensor-parallel test).
  _assert_same(whole, _run(make(), accum_steps=2),
               param_atol=1e-4)


def test_micro_batches_interleave_rows():
  x = np.arange(12)
  np.testing.assert_array_equal(step_lib.micro_batches(x, 3),
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
  with pytest.raises(ValueError, match="grad_accum_steps=5"):
    step_lib.micro_batches(x, 5)


def test_boxed_state_keeps_logical_axes_for_sharding():
  config = _config()
  model = models.get(config.student, 5)
  tx = optim.make(config.optim, total_steps=10)
  x = jnp.zeros((1, 1000, 12))
  abstract = jax.eval_shape(build.state_initializer(model, tx, config, x),
                            jax.random.PRNGKey(0))
  boxes = [x for x in jax.tree.leaves(
      abstract.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
           if isinstance(x, nn.LogicallyPartitioned)]
  assert boxes and len(boxes) == len(jax.tree.leaves(abstract.params))
  mu = abstract.opt_state[1][0].mu
  mu_boxes = jax.tree.leaves(
      mu, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  # Adam's moments carry their params' logical axes.
  assert [b.names for b in mu_boxes] == [b.names for b in boxes]
