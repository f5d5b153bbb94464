"""The train state: everything a resumed run needs besides the data iterator."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
  """step, params {"model": ...}, optimiser state and the base PRNG key.

  The key is a raw uint32[2] key so that it checkpoints as a plain array.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, *, params, tx, rng):
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params), rng=rng)
