"""Edge deployment of a trained model (docs/deploy.md).

  python -m evl_ecg_jax.export --workdir=RUN

`trained.load` reads the run's model and params; `graph.convert` traces its
inference function (ECG -> class probabilities) to ONNX; `quantize` makes
the float16 and int8 (calibrated) variants; `runtime` runs them with
onnxruntime; `parity` measures them against the JAX model; `builder.export`
does all of it into one folder.
"""
