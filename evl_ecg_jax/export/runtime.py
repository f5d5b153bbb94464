"""Running an exported graph with onnxruntime (the CPU execution provider)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from evl_ecg_jax.export import graph


def session(model: onnx.ModelProto | str, threads: int = 0
            ) -> ort.InferenceSession:
  """An onnxruntime session; `threads` = 0: onnxruntime's default (all
  cores), 1: single-threaded (intra- and inter-op)."""
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = threads
  options.log_severity_level = 3  # errors only
  source = model if isinstance(model, str) else model.SerializeToString()
  return ort.InferenceSession(source, options,
                              providers=["CPUExecutionProvider"])


def fixed_batch(sess: ort.InferenceSession) -> int:
  """The graph's batch size, 0 if dynamic."""
  dim = sess.get_inputs()[0].shape[0]
  return dim if isinstance(dim, int) else 0


def predict(sess: ort.InferenceSession, ecg: np.ndarray,
            batch_size: int = 256) -> np.ndarray:
  """Probabilities [N, C] for ECGs [N, T, L]; a fixed-batch graph gets its
  batch size, the last chunk zero-padded."""
  fixed = fixed_batch(sess)
  size = fixed or batch_size
  out = []
  for i in range(0, len(ecg), size):
    chunk = ecg[i:i + size].astype(np.float32)
    n = len(chunk)
    if n < size and fixed:
      chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:],
                                              np.float32)])
    out.append(sess.run([graph.OUTPUT], {graph.INPUT: chunk})[0][:n])
  return np.concatenate(out)
