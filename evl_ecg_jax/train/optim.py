"""Optimiser from `config.optim`: clip -> AdamW with warmup + cosine decay."""

from __future__ import annotations

import jax
import optax


def _decay_mask(params):
  """Weight decay on matrices/kernels only, not on biases, norms, embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and "embed" not in jax.tree_util.keystr(path),
      params)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to 0 at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.learning_rate,
      warmup_steps=optim_cfg.warmup_steps, decay_steps=total_steps,
      end_value=0.0)


def make(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule above."""
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(optim_cfg, total_steps),
                  b1=optim_cfg.b1, b2=optim_cfg.b2,
                  weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
