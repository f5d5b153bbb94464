"""The optimiser: one global clip, or the distillation heads on their own."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from evl_ecg_jax.train import optim


def _cfg(heads_clip=0.0, heads_scale=1.0):
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999,
      grad_clip_norm=1.0, heads_grad_clip_norm=heads_clip,
      heads_learning_rate_scale=heads_scale))


def _params():
  return {"model": {"w": jnp.ones((3,))}, "heads": {"v": jnp.ones((2,))}}


def _grads(head_norm):
  """Student gradient of norm 0.5, heads' of `head_norm`."""
  return {"model": {"w": jnp.array([0.3, 0.4, 0.0])},
          "heads": {"v": jnp.array([head_norm, 0.0])}}


def _second_student_update(cfg, head_norm):
  """The student's update at step 2, after a first step whose head
  gradient has norm `head_norm` (Adam's first step is scale-free, so a
  clip shows in the moments it leaves behind)."""
  tx, params = optim.make(cfg, total_steps=10), _params()
  state = tx.init(params)
  _, state = tx.update(_grads(head_norm), state, params)
  update, _ = tx.update(_grads(0.1), state, params)
  return np.asarray(update["model"]["w"])


def test_separate_heads_leave_the_student_update_alone():
  cfg = _cfg(heads_clip=1.0)
  np.testing.assert_allclose(_second_student_update(cfg, 5.0),
                             _second_student_update(cfg, 0.1), rtol=1e-6)


def test_one_global_clip_lets_a_large_head_gradient_change_the_student():
  # Without heads_grad_clip_norm, a head gradient above the clip rescales
  # every gradient, the student's too (what issue #19 measured).
  cfg = _cfg()
  assert np.max(np.abs(_second_student_update(cfg, 5.0)
                       - _second_student_update(cfg, 0.1))) > 1e-4


def test_heads_learning_rate_scale():
  params = _params()
  lr = lambda scale: optim.make(_cfg(heads_clip=1.0, heads_scale=scale),
                                total_steps=100)
  u1, _ = lr(1.0).update(_grads(0.1), lr(1.0).init(params), params)
  u01, _ = lr(0.1).update(_grads(0.1), lr(0.1).init(params), params)
  np.testing.assert_allclose(u01["heads"]["v"], 0.1 * u1["heads"]["v"],
                             rtol=1e-5)
  np.testing.assert_allclose(u01["model"]["w"], u1["model"]["w"], rtol=1e-6)
  assert jax.tree.structure(u01) == jax.tree.structure(params)


def test_heads_scale_without_the_heads_optimiser_is_refused():
  with np.testing.assert_raises_regex(ValueError,
                                      "heads_learning_rate_scale.*"
                                      "heads_grad_clip_norm"):
    optim.make(_cfg(heads_clip=0.0, heads_scale=0.1), total_steps=10)
