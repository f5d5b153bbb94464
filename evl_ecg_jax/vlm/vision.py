"""Vision-tower pretraining for VLMs trained from scratch.

A VLM normally starts from a pretrained image encoder (CLIP, SigLIP). We
have none, and a tiny VLM trained from random weights on answer tokens
alone learns to ignore the printout: on the synthetic ECGs its soft AUC
stayed at 0.48-0.53 after 1000 steps (docs/vlm.md). So each VLM's ViT is
first trained on the labels (mean-pooled tokens -> linear -> multi-label
BCE), and the VLM starts from it. `config.vlm.vision_pretrain_steps = 0`
skips this (e.g. when loading a pretrained encoder).
"""

from __future__ import annotations

import functools
from typing import Iterator

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from evl_ecg_jax.models import vlm as vlm_lib


class LabelProbe(nn.Module):
  """The VLM's image ViT (same fields, params under "vit") + linear head."""
  vlm: vlm_lib.ECGVLM
  num_classes: int

  @nn.compact
  def __call__(self, image):
    m = self.vlm
    tokens = vlm_lib.ImageViT(
        m.patch_size, m.vit_width, m.vit_depth, m.vit_heads, m.vit_mlp_dim,
        m.pool, m.remat, m.scan, dtype=m.dtype, param_dtype=m.param_dtype,
        name="vit")(image)
    return nn.Dense(self.num_classes, name="head")(tokens.mean(axis=1))


def pretrain(model: vlm_lib.ECGVLM, batches: Iterator, *, steps: int,
             num_classes: int, learning_rate: float, seed: int = 0):
  """(ViT params (unboxed), [BCE of each step]) after `steps` BCE steps on
  batches {"image", "labels"}."""
  probe = LabelProbe(model, num_classes)
  first = next(batches)
  params = nn.meta.unbox(jax.jit(probe.init)(  # one program, not op by op
      jax.random.PRNGKey(seed), jnp.asarray(first["image"])))["params"]
  tx = optax.adam(learning_rate)
  opt_state = jax.jit(tx.init)(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, image, labels):
    def loss_fn(p):
      logits = probe.apply({"params": p}, image)
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch, history = first, []
  for i in range(steps):
    if i:
      batch = next(batches)
    params, opt_state, loss = step(params, opt_state,
                                   jnp.asarray(batch["image"]),
                                   jnp.asarray(batch["labels"]))
    history.append(loss)
  history = [float(x) for x in history]
  logging.info("Vision pretraining: %d steps, BCE %.4f -> %.4f.", steps,
               history[0], history[-1])
  return params["vit"], history


def with_vision(init, vit_params):
  """`init` (rng -> boxed TrainState) with params["model"]["vit"] replaced
  by `vit_params`, keeping the logical-axis boxes."""
  def is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)

  def wrapped(rng):
    state = init(rng)
    params = dict(state.params)
    model = dict(params["model"])
    model["vit"] = jax.tree.map(
        lambda box, new: box.replace_boxed(new) if is_box(box) else new,
        model["vit"], vit_params, is_leaf=is_box)
    params["model"] = model
    return state.replace(params=params)
  return wrapped
