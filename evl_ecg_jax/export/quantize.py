"""Post-training quantisation of an exported float32 ONNX graph.

- float16: weights and compute in float16, float32 inputs/outputs (so the
  caller's code does not change).
- int8: static quantisation (onnxruntime, QDQ format): int8 weights per
  output channel (symmetric), uint8 activations whose ranges are calibrated
  on ECGs of the training split. Only the matrix operators (Conv, MatMul,
  Gemm) are quantised, where the time goes; normalisation, GELU and the
  sigmoid stay in float (their outputs feed the next quantised operator
  through a calibrated QuantizeLinear).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx

from evl_ecg_jax.export import graph

INT8_OPS = ("Conv", "MatMul", "Gemm")


def float16(model: onnx.ModelProto) -> onnx.ModelProto:
  """The float16 graph of `model`, keeping float32 inputs and outputs."""
  # pylint: disable=g-import-not-at-top
  from onnxruntime.transformers import float16 as ort_float16
  return ort_float16.convert_float_to_float16(_copy(model),
                                             keep_io_types=True)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
  """onnxruntime's tools edit the proto they get (e.g. move its weights to
  external files during int8 calibration): hand them a copy."""
  out = onnx.ModelProto()
  out.CopyFrom(model)
  return out


class _NoPreprocessingHint(logging.Filter):
  """Drops onnxruntime's advice to run its pre-processing (shape inference
  + graph optimisation) first: we skip it on purpose, as it expands
  GroupNormalization into ~10 primitive ops, each then quantised, which
  made the int8 file 3x larger than the float32 one for the CNN student."""

  def filter(self, record):
    return "pre-processing" not in record.getMessage()


class _Calibration:
  """onnxruntime CalibrationDataReader over [N, T, L] in `batch` chunks."""

  def __init__(self, ecg: np.ndarray, batch: int):
    self._chunks = iter(ecg[i:i + batch] for i in range(0, len(ecg), batch)
                        if len(ecg[i:i + batch]) == batch)

  def get_next(self):
    chunk = next(self._chunks, None)
    return None if chunk is None else {graph.INPUT: chunk}


def int8(model: onnx.ModelProto, calibration: np.ndarray, *,
         batch: int = 0, method: str = "minmax",
         reduce_range: bool = False) -> onnx.ModelProto:
  """Static int8 quantisation of `model`, activations calibrated on
  `calibration` ECGs [N, T, L] (float32, preprocessed as for the model).

  `batch`: the graph's fixed batch (0: dynamic, calibrated in chunks of 32).
  `method`: "minmax" or "percentile" (99.999th, robust to outliers).
  `reduce_range`: 7-bit weights: no int16 saturation on x86 CPUs without
  VNNI, so the result does not depend on the CPU (builder.Options).
  """
  # pylint: disable=g-import-not-at-top
  from onnxruntime import quantization as q
  methods = {"minmax": q.CalibrationMethod.MinMax,
             "percentile": q.CalibrationMethod.Percentile}
  if method not in methods:
    raise ValueError(f"calibration method={method!r}: expected one of "
                     f"{sorted(methods)}.")
  chunk = batch or min(32, len(calibration))
  if len(calibration) < chunk:
    raise ValueError(f"{len(calibration)} calibration ECGs: expected at least "
                     f"one batch of {chunk}.")
  hint = _NoPreprocessingHint()
  logging.getLogger().addFilter(hint)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "int8.onnx")
      q.quantize_static(
          _copy(model), out,
          _Calibration(calibration.astype(np.float32), chunk),
          quant_format=q.QuantFormat.QDQ,
          op_types_to_quantize=list(INT8_OPS), per_channel=True,
          reduce_range=reduce_range, activation_type=q.QuantType.QUInt8,
          weight_type=q.QuantType.QInt8, calibrate_method=methods[method])
      return onnx.load(out)
  finally:
    logging.getLogger().removeFilter(hint)
