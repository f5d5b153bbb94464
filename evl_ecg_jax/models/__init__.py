"""Model registry: `get(model_cfg, num_classes)` -> Linen module (no params)."""

from __future__ import annotations

from typing import Any, Mapping

from evl_ecg_jax.models.cnn1d import CNN1D
from evl_ecg_jax.models.vit1d import ViT1D

MODELS = {"vit1d": ViT1D, "cnn1d": CNN1D}
# Config keys of a model block that are not module fields.
_NOT_FIELDS = ("name", "init")


def get(model_cfg: Mapping[str, Any], num_classes: int):
  """Builds the module named `model_cfg["name"]` from the block's fields."""
  name = model_cfg["name"]
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; registered: {sorted(MODELS)}.")
  kwargs = {k: v for k, v in dict(model_cfg).items() if k not in _NOT_FIELDS}
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["CNN1D", "MODELS", "ViT1D", "get"]
