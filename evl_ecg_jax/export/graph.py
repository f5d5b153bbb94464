"""JAX inference function -> ONNX graph (jax2onnx), with deployment metadata.

jax2onnx traces the function to a jaxpr and maps each primitive (and the
Flax Linen conv / norm / pooling modules) to ONNX operators, so the graph is
the function XLA runs, not a re-implementation. Opset 21 is the lowest that
has every operator our models need as one node (Gelu: 20,
GroupNormalization: 21).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from typing import Callable, Mapping

import onnx

from evl_ecg_jax.export import rewrite

OPSET = 21
INPUT, OUTPUT = "ecg", "probs"


@contextlib.contextmanager
def _quiet():
  """jax2onnx 0.13.0 logs tracebacks for its plugins of libraries we do not
  use (dm_pix, on this jax) and prints debug lines while tracing."""
  logger = logging.getLogger("jax2onnx")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logger.setLevel(level)


def convert(fn: Callable, input_shape: tuple[int, int], *, batch: int = 0,
            opset: int = OPSET) -> onnx.ModelProto:
  """ONNX graph of `fn`: ecg [B, T, L] float32 -> probs [B, C] float32.

  GroupNormalization nodes are rewritten to ops with native onnxruntime
  kernels (export/rewrite.py: 1.7x faster for the CNN student).

  `batch` = 0 leaves the batch dimension symbolic ("batch": any size);
  otherwise the graph takes exactly `batch` ECGs.
  """
  dims = ("batch" if batch == 0 else batch,) + tuple(input_shape)
  with _quiet():
    import jax2onnx  # pylint: disable=g-import-not-at-top
    model = jax2onnx.to_onnx(fn, [dims], opset=opset,
                             model_name="evl_ecg_student",
                             input_names=[INPUT], output_names=[OUTPUT])
  return rewrite.group_norm_to_instance_norm(model)  # checks the model


def annotate(model: onnx.ModelProto, metadata: Mapping[str, object]
             ) -> onnx.ModelProto:
  """Sets `metadata` (JSON values) as the model's metadata_props, so a
  deployed file says what it expects (classes, rate, preprocessing)."""
  del model.metadata_props[:]
  for key, value in metadata.items():
    model.metadata_props.add(key=key, value=json.dumps(value))
  return model


def metadata(model: onnx.ModelProto) -> dict:
  """The metadata_props `convert` stored, decoded."""
  return {p.key: json.loads(p.value) for p in model.metadata_props}
