"""Model registry and helpers that need no allocation.

`get(model_cfg, num_classes)` -> Linen module (no params). Every model maps
an ECG [B, T, 12] to (logits [B, C], {tap: hidden state}); see
`layers.Taps` for asking a model for chosen hidden states.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.models import presets
from evl_ecg_jax.models.cnn1d import CNN1D
from evl_ecg_jax.models.convnext1d import ConvNeXt1D
from evl_ecg_jax.models.layers import LEADS, lead_indices
from evl_ecg_jax.models.vit1d import ViT1D
from evl_ecg_jax.models.xresnet1d import XResNet1D

MODELS = {"vit1d": ViT1D, "cnn1d": CNN1D, "xresnet1d": XResNet1D,
          "convnext1d": ConvNeXt1D}
# Keys of the teacher block that say where its outputs come from (a
# checkpoint, a store, an ONNX graph), not what the model is.
SOURCE_FIELDS = ("init", "cache_features", "onnx", "onnx_spec", "store_dtype",
                 "store_dir")
# Config keys of a model block that are not module fields.
_NOT_FIELDS = ("name", "frozen_param_dtype") + SOURCE_FIELDS


def get(model_cfg: Mapping[str, Any], num_classes: int, *,
        field: str = "model"):
  """Builds the module named `model_cfg["name"]` from the block's fields.

  Dtype fields may be strings ("float32", "bfloat16"). Errors name
  `config.<field>.<key>`.
  """
  name = model_cfg["name"]
  if name not in MODELS:
    raise ValueError(f"config.{field}.name={name!r}: unknown model; "
                     f"registered: {sorted(MODELS)}.")
  kwargs = {k: v for k, v in dict(model_cfg).items() if k not in _NOT_FIELDS}
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  try:
    lead_indices(kwargs.get("leads", "all"))
  except ValueError as e:
    raise ValueError(f"config.{field}.{e}") from None
  fields = {f.name for f in MODELS[name].__dataclass_fields__.values()}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    known = sorted(fields - {"parent", "name"})
    raise ValueError(f"config.{field}: {unknown} are not fields of "
                     f"{MODELS[name].__name__} (fields: {known}).")
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, rng, example_ecg):
  """Initialised params as plain arrays (logical-axis metadata dropped).

  Compiled as one program: op by op, each initialiser and layer is its own
  compile (cnn1d tiny on CPU: 3.7 s eager, 0.8 s jitted).
  """
  return nn.meta.unbox(jax.jit(model.init)(rng, example_ecg))["params"]


def abstract_variables(model: nn.Module, input_shape: Sequence[int]):
  """`jax.eval_shape` of `model.init`: shapes, dtypes and logical axes."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Number of parameters, without allocating them."""
  leaves = jax.tree.leaves(nn.meta.unbox(
      abstract_variables(model, input_shape)["params"]))
  return int(sum(x.size for x in leaves))


def flops_per_example(model: nn.Module, input_shape: Sequence[int] = (),
                      *, inputs=None) -> float:
  """Forward FLOPs for one example (XLA's cost analysis of the lowering).

  The example is an ECG of `input_shape` (its batch dimension ignored), or
  `inputs` = (args, kwargs) of one example for other models (a VLM's
  image, tokens and mask: `task.inputs`). Counts every op once, so it is
  exact for models without loops: a model with scanned blocks is counted
  unrolled (XLA would count the loop body once); remat does not change the
  forward.
  """
  if getattr(model, "scan", False):
    model = model.clone(scan=False)
  if inputs is None:
    inputs = ((jax.ShapeDtypeStruct((1,) + tuple(input_shape[1:]),
                                    jnp.float32),), {})
  args, kwargs = inputs
  variables = jax.eval_shape(functools.partial(model.init, **kwargs),
                             jax.random.PRNGKey(0), *args)
  lowered = jax.jit(lambda v, a, k: model.apply(v, *a, taps=(), **k)).lower(
      nn.meta.unbox(variables), args, kwargs)
  return float(lowered.cost_analysis()["flops"])


def tap_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict:
  """{tap: shape} of every feature tap `model` offers (no allocation)."""
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  _, feats = jax.eval_shape(
      lambda v, e: model.apply(v, e, taps=None), variables, x)
  return {name: tuple(f.shape) for name, f in feats.items()}


def tap_names(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
  """Every feature tap `model` offers (sorted)."""
  return sorted(tap_shapes(model, input_shape))


__all__ = ["CNN1D", "ConvNeXt1D", "LEADS", "MODELS", "ViT1D", "XResNet1D",
           "abstract_variables", "count_params", "flops_per_example", "get",
           "init_params",
           "presets", "tap_names", "tap_shapes"]
