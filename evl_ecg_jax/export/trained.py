"""A trained signal model read back from its workdir, and its predictions."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from evl_ecg_jax import checkpoint
from evl_ecg_jax import models
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.models import layers
from evl_ecg_jax.train import build
from evl_ecg_jax.train import step as step_lib


class ExportError(ValueError):
  """A workdir or option that cannot be exported; says which and why."""


@dataclasses.dataclass(frozen=True)
class Trained:
  """The model a run trained (`block`: student or teacher) and its params."""
  workdir: str
  config: ml_collections.ConfigDict
  block: str
  model: nn.Module
  params: Any  # the model's params pytree (no optimizer state)
  checkpoint: str  # "latest" | "best"

  @property
  def input_shape(self) -> tuple[int, int]:
    """(samples, leads) of one ECG as the model reads it (after the
    preprocessing of config.data.transforms)."""
    example = pipeline.example(self.config.data)["ecg"]
    return tuple(int(d) for d in example.shape)

  def probabilities(self):
    """ecg -> probabilities of this model (see `probabilities`)."""
    return probabilities(self.model, self.params)

  def predict(self, ecg: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """JAX probabilities for host ECGs [N, T, L] (jitted, in batches)."""
    fn = jax.jit(self.probabilities())
    return np.concatenate([np.asarray(fn(ecg[i:i + batch_size]))
                           for i in range(0, len(ecg), batch_size)])


def probabilities(model: nn.Module, params):
  """ecg [B, T, L] -> per-class probabilities [B, C] (the eval predictor,
  train/step.predict_step, as a pure function of the signal: the params are
  closed over, so an exporter sees constants)."""
  return lambda ecg: step_lib.predict_step({"model": params}, {"ecg": ecg},
                                           model=model)


def load(workdir: str, which: str = "best", *,
         data_overrides: dict | None = None) -> Trained:
  """The model trained in `workdir` (its `which` checkpoint) and its config.

  `data_overrides` replace fields of the stored `config.data` (e.g.
  data_dir / manual_dir when the run was trained on another machine).
  Raises ExportError for a workdir without a checkpoint or holding a model
  that is not a signal classifier.
  """
  if not checkpoint.has_checkpoint(workdir):
    raise ExportError(f"--workdir={workdir}: no checkpoint in "
                      f"{checkpoint.directory(workdir)}; expected the "
                      "workdir of a finished train_teacher or distill run.")
  config = ml_collections.ConfigDict(checkpoint.load_config(workdir))
  if config.get("model_kind", "signal") != "signal":
    raise ExportError(
        f"--workdir={workdir}: config.model_kind={config.model_kind!r}; "
        "the exporter takes signal models (ECG -> class probabilities), not "
        "vision-language models.")
  for key, value in (data_overrides or {}).items():
    if value:
      config.data[key] = value
  block = build.trained_block(config)
  model = models.get(config[block], len(config.data.class_names),
                     field=block)
  params = jax.tree.map(np.asarray,
                        checkpoint.load_params(workdir, which)["model"])
  if getattr(model, "scan", False):  # exported unrolled: no loop in graphs.
    model = model.clone(scan=False)
    shape = (1,) + tuple(pipeline.example(config.data)["ecg"].shape)
    params = layers.block_layout(params, nn.meta.unbox(
        models.abstract_variables(model, shape)["params"]))
  return Trained(workdir, config, block, model, params, which)
