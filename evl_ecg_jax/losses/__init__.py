"""Pure, jit-able loss functions of EVL-ECG and its baselines.

Arrays are batched ([B, N, D] tokens, [B, N] bool masks with True = valid);
every loss returns a float32 scalar (mean over the batch), computes in
float32 even for bf16 inputs, and never reads a config. docs/losses.md
("Loss API") maps each function to its equation.
"""

# EVL-ECG: Eq. 9, its three feature terms, and the objective (EVL and the
# baselines as weighted parts, losses/terms.py).
from evl_ecg_jax.losses.evl import evl_loss
from evl_ecg_jax.losses.objective import build as build_objective
from evl_ecg_jax.losses.objective import DistillHeads
from evl_ecg_jax.losses.objective import Objective
from evl_ecg_jax.losses.terms import TERMS
from evl_ecg_jax.losses.mhca import mhca_loss
from evl_ecg_jax.losses.mhca import mhca_reconstruction_loss
from evl_ecg_jax.losses.mhca import MHCAAligner
from evl_ecg_jax.losses.ot import ot_loss
from evl_ecg_jax.losses.relation import relation_loss
# Task losses.
from evl_ecg_jax.losses.task import sigmoid_bce_loss
from evl_ecg_jax.losses.task import softmax_ce_loss
from evl_ecg_jax.losses.task import token_ce_loss
# Baselines.
from evl_ecg_jax.losses.hints import fitnet_loss
from evl_ecg_jax.losses.hints import HintRegressor
from evl_ecg_jax.losses.hints import tinybert_loss
from evl_ecg_jax.losses.contrastive import crd_loss
from evl_ecg_jax.losses.kd import dist_loss
from evl_ecg_jax.losses.kd import dkd_loss
from evl_ecg_jax.losses.kd import logit_kd_loss
from evl_ecg_jax.losses.kd import softmax_kd_loss
from evl_ecg_jax.losses.kd import uld_loss
from evl_ecg_jax.losses.relation import rkd_loss
# Shared numerics the diagnostics read too.
from evl_ecg_jax.losses._ops import cosine_matrix
from evl_ecg_jax.losses._ops import f32
from evl_ecg_jax.losses._ops import pool_tokens

__all__ = [
    "DistillHeads", "HintRegressor", "MHCAAligner", "Objective", "TERMS",
    "build_objective", "cosine_matrix", "crd_loss", "f32", "pool_tokens", "dist_loss", "dkd_loss", "evl_loss",
    "fitnet_loss", "logit_kd_loss", "mhca_loss",
    "mhca_reconstruction_loss", "ot_loss", "relation_loss", "rkd_loss",
    "sigmoid_bce_loss", "softmax_ce_loss", "softmax_kd_loss", "tinybert_loss",
    "token_ce_loss", "uld_loss",
]
