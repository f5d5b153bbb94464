"""Optimiser from `config.optim`: clip -> AdamW with warmup + cosine decay.

The learned heads of the distillation terms (params["heads"]: MHCA aligner,
OT projection, hint regressors) can have their own clip and learning-rate
scale (`heads_grad_clip_norm` > 0; optax.multi_transform). With one global
clip, the aligner's reconstruction gradient (norm 1.3 at initialisation,
above the clip of 1.0) rescaled the student's task step in EVL runs.
"""

from __future__ import annotations

import jax
import optax


def _decay_mask(params):
  """Weight decay on matrices/kernels only, not on biases, norms, embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and "embed" not in jax.tree_util.keystr(path),
      params)


def learning_rate_schedule(optim_cfg, total_steps: int,
                           scale: float = 1.0) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to 0 at total_steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.learning_rate * scale,
      warmup_steps=optim_cfg.warmup_steps, decay_steps=total_steps,
      end_value=0.0)


def _clipped_adamw(optim_cfg, total_steps, clip_norm, lr_scale=1.0):
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(learning_rate_schedule(optim_cfg, total_steps, lr_scale),
                  b1=optim_cfg.b1, b2=optim_cfg.b2,
                  weight_decay=optim_cfg.weight_decay, mask=_decay_mask))


def _group(params):
  """"heads" for the distillation heads' subtree, "model" for the rest."""
  return {k: "heads" if k == "heads" else "model" for k in params}


def make(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule above.

  With `optim_cfg.heads_grad_clip_norm` > 0 the heads are clipped on their
  own and their learning rate is scaled by `heads_learning_rate_scale`;
  with 0 one clip covers every parameter (and the scale must stay 1).
  """
  if not optim_cfg.heads_grad_clip_norm:
    if optim_cfg.heads_learning_rate_scale != 1.0:
      raise ValueError(
          "config.optim.heads_learning_rate_scale="
          f"{optim_cfg.heads_learning_rate_scale} needs the heads' own "
          "optimiser: set config.optim.heads_grad_clip_norm > 0 (with 0 one "
          "AdamW updates every parameter and the scale would be ignored).")
    return _clipped_adamw(optim_cfg, total_steps, optim_cfg.grad_clip_norm)
  return optax.multi_transform({
      "model": _clipped_adamw(optim_cfg, total_steps,
                              optim_cfg.grad_clip_norm),
      "heads": _clipped_adamw(optim_cfg, total_steps,
                              optim_cfg.heads_grad_clip_norm,
                              optim_cfg.heads_learning_rate_scale),
  }, _group)
