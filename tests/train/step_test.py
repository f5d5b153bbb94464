"""The per-device step under pmap: 8 devices agree with 1 device."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from evl_ecg_jax import losses
from evl_ecg_jax import models
from evl_ecg_jax import parallel
from evl_ecg_jax.train import guards
from evl_ecg_jax.train import optim
from evl_ecg_jax.train import state as state_lib
from evl_ecg_jax.train import step as step_lib

OPTIM = ml_collections.ConfigDict(dict(
    learning_rate=1e-3, warmup_steps=1, weight_decay=1e-4, b1=0.9, b2=0.999,
    grad_clip_norm=1.0, heads_grad_clip_norm=0.0, heads_learning_rate_scale=1.0))


# threshold 0: Sinkhorn runs exactly max_iterations on every shard. With a
# tolerance, a shard stops when its slowest sequence converges, so 1 and 8
# devices would agree only to within that tolerance.
LOSSES = {
    "ce": dict(alpha=0.0),
    "kd": dict(alpha=0.5, terms=dict(kd=dict(weight=1.0, temperature=2.0))),
    "evl": dict(alpha=0.5, terms=dict(
        mhca=dict(weight=1.0), relation=dict(weight=1.0),
        ot=dict(weight=1.0, epsilon=0.1, threshold=0.0, max_iterations=100))),
}


def _setup(loss):
  # dropout=0: with dropout each device draws its own mask, by design.
  student = models.CNN1D(num_classes=5, widths=(8, 16), dropout=0.0)
  teacher = models.ViT1D(num_classes=5, patch_size=25, width=16, depth=1,
                         num_heads=2, mlp_dim=32)
  rng = np.random.default_rng(0)
  batch = {"ecg": rng.normal(size=(16, 200, 12)).astype(np.float32),
           "labels": (rng.random((16, 5)) < 0.3).astype(np.float32)}
  x = jnp.asarray(batch["ecg"][:1])
  teacher_params = models.init_params(teacher, jax.random.PRNGKey(1), x)
  tx = optim.make(OPTIM, total_steps=10)
  objective = losses.build_objective(**LOSSES[loss])
  params = {"model": models.init_params(student, jax.random.PRNGKey(0), x)}
  if objective.heads is not None:
    params["heads"] = objective.init_heads(
        jax.random.PRNGKey(3),
        student.apply({"params": params["model"]}, x)[1],
        teacher.apply({"params": teacher_params}, x)[1])
  state = state_lib.TrainState.create(params=params, tx=tx,
                                      rng=jax.random.PRNGKey(2))
  step = functools.partial(
      step_lib.train_step, model=student,
      teacher=teacher if objective.alpha > 0 else None,
      objective=objective, tx=tx)
  return state, teacher_params, batch, step


def _run(n_dev, loss, steps=3, wrapper="pmap"):
  state, teacher_params, batch, step = _setup(loss)
  devices = jax.devices()[:n_dev]
  # Placed as the runner places them (replicated), so that the first step's
  # inputs carry the shardings of its outputs: one compile, not two.
  state, teacher_params = parallel.replicate((state, teacher_params), devices)
  if wrapper == "pmap":
    p_step = parallel.pmap_train_step(step, devices=devices)
    batch = parallel.split_batch(batch, n_dev)
  else:
    mesh = jax.sharding.Mesh(np.asarray(devices), (parallel.AXIS,))
    p_step = parallel.shard_map_train_step(
        step, mesh, check_vma=wrapper == "shard_map")
    batch = jax.device_put(batch, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(parallel.AXIS)))
  history = []
  for _ in range(steps):
    state, metrics = p_step(state, teacher_params, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _assert_same(run_a, run_b):
  (state_a, hist_a), (state_b, hist_b) = run_a, run_b
  for m_a, m_b in zip(hist_a, hist_b):
    assert set(m_a) == set(m_b)
    for k in m_a:
      np.testing.assert_allclose(m_b[k], m_a[k], rtol=2e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               state_b.params, state_a.params)


# The default suite checks this parity in tests/train/parallel_modes_test.py
# (EVL with its KD and CE terms, pmap and spmd, two examples per device);
# here, per loss, under `make test-slow`.
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "kd", "evl"])
def test_eight_devices_match_one(loss):
  assert jax.device_count() >= 8
  state1, hist1 = run1 = _run(1, loss)
  state8, _ = run8 = _run(8, loss)
  _assert_same(run1, run8)
  assert int(state8.step) == 3
  assert hist1[-1]["loss"] < hist1[0]["loss"]  # the step does optimise


# The default suite runs parallel=shard_map (the runner, unchecked) in
# tests/train/parallel_modes_test.py's EVL parity.
@pytest.mark.parametrize("loss,wrapper", [
    pytest.param("kd", "shard_map", marks=pytest.mark.slow),
    pytest.param("kd", "shard_map_unchecked", marks=pytest.mark.slow),
    # EVL's parity across devices runs by default in parallel_modes_test.
    pytest.param("evl", "shard_map_unchecked", marks=pytest.mark.slow)])
def test_shard_map_on_a_mesh_matches_pmap(loss, wrapper):
  """The same per-device step under jit + shard_map agrees with pmap.

  With loss=evl this runs ott-jax's vmapped Sinkhorn (and our implicit
  gradient) inside shard_map, which needs check_vma=False ("unchecked").
  """
  _assert_same(_run(8, loss), _run(8, loss, wrapper=wrapper))


def test_step_metrics_and_teacher_frozen():
  state, teacher_params, batch, step = _setup("kd")
  before = jax.tree.map(np.array, teacher_params)
  devices = jax.devices()[:2]
  p_step = parallel.pmap_train_step(step, devices=devices)
  new_state, teacher_params = parallel.replicate((state, teacher_params),
                                                 devices)
  for _ in range(2):  # the warmup schedule's learning rate at step 0 is 0
    new_state, metrics = p_step(new_state, teacher_params,
                                parallel.split_batch(batch, 2))
  assert set(metrics) == {"loss", "ce", "kd", "grad_norm", "finite"}
  assert all(np.isfinite(float(v)) for v in metrics.values())
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get(teacher_params))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(new_state.params),
                         jax.device_get(_setup("kd")[0].params))
  assert all(jax.tree.leaves(changed))


def test_non_finite_step_is_not_applied():
  """A NaN in the batch: params and optimizer state stay, the step counts."""
  state, teacher_params, batch, step = _setup("kd")
  devices = jax.devices()[:2]
  p_step = parallel.pmap_train_step(step, devices=devices)
  state, teacher_params = parallel.replicate((state, teacher_params), devices)
  state, metrics = p_step(state, teacher_params,
                          parallel.split_batch(batch, 2))
  assert float(metrics["finite"]) == 1.0
  before = jax.device_get(state)
  bad = dict(batch, ecg=batch["ecg"].copy())
  bad["ecg"][3, 10, 0] = np.nan
  after, metrics = p_step(state, teacher_params, parallel.split_batch(bad, 2))
  after = jax.device_get(after)
  assert float(metrics["finite"]) == 0.0 and not np.isfinite(metrics["loss"])
  assert int(after.step) == int(before.step) + 1
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state,
               before.opt_state)


def test_guard_counts_skipped_steps_and_stops_after_k_in_a_row():
  guard = guards.NonFiniteGuard(max_consecutive=3)
  guard.check(1, np.float32(0.0), np.array([7, 8]))
  guard.check(2, np.float32(1.0), np.array([9]))  # a good step resets
  guard.check(3, np.float32(0.0), np.array([1]))
  guard.check(4, np.float32(0.0), np.array([2]))
  assert (guard.total, guard.consecutive) == (3, 2)
  with pytest.raises(FloatingPointError,
                     match=r"3 consecutive steps up to step 5.*\[5, 6\]"):
    guard.check(5, np.float32(0.0), np.array([5, 6]))
