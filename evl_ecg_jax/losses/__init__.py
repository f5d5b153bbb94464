"""Pure, jit-able loss functions of EVL-ECG and its baselines.

Arrays are batched; every loss returns a float32 scalar (mean over the batch)
and never reads a config.
"""

from evl_ecg_jax.losses.evl import make_objective
from evl_ecg_jax.losses.kd import logit_kd_loss
from evl_ecg_jax.losses.relation import relation_loss
from evl_ecg_jax.losses.task import sigmoid_bce_loss

__all__ = ["logit_kd_loss", "make_objective", "relation_loss",
           "sigmoid_bce_loss"]
