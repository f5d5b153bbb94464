r"""Exports a trained student (or teacher) for edge deployment.

  python -m evl_ecg_jax.export --workdir=workdir/demo/student_evl \
      [--format=onnx] [--precisions=float32,float16,int8] [--batch=0]

Writes <workdir>/export/ (or --out): model_float32.onnx, model_float16.onnx,
model_int8.onnx and export.json (what the graph expects, file sizes, and
parity with the JAX model on the test split). Exits with status 1 when a
variant misses its parity bound (evl_ecg_jax.export.parity.BOUNDS).
docs/deploy.md explains the choices (ONNX through jax2onnx, onnxruntime
static int8).
"""

from __future__ import annotations

import importlib.util
import sys

from absl import app
from absl import flags

_MISSING = [m for m in ("onnx", "onnxruntime", "jax2onnx")
            if importlib.util.find_spec(m) is None]
if _MISSING:
  sys.exit(f"Edge export needs the [export] extra ({', '.join(_MISSING)} "
           "not installed): pip install -e '.[export]' (make test installs "
           "it).")

# pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.export import builder
from evl_ecg_jax.export import trained as trained_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_D = builder.Options()
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Workdir of a train_teacher or distill run.")
_OUT = flags.DEFINE_string("out", None, "Output folder (<workdir>/export).")
# ONNX only: docs/deploy.md compares it with TFLite (jax2tf) and says why.
_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx"], "Export format.")
_PRECISIONS = flags.DEFINE_list("precisions", list(_D.precisions),
                                "Variants to write.")
_BATCH = flags.DEFINE_integer("batch", _D.batch,
                              "0: dynamic batch; N: fixed batch of N.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", _D.checkpoint,
                                ["best", "latest"], "Checkpoint to export.")
_CALIBRATION = flags.DEFINE_integer(
    "calibration_examples", _D.calibration_examples,
    "int8: ECGs drawn from the training split to calibrate activations.")
_CALIBRATION_METHOD = flags.DEFINE_enum(
    "calibration_method", _D.calibration_method, ["minmax", "percentile"],
    "int8: activation range estimate.")
_REDUCE_RANGE = flags.DEFINE_bool(
    "reduce_range", _D.reduce_range,
    "int8: 7-bit weights, the same integers on every x86 CPU (VNNI or not).")
_SPLIT = flags.DEFINE_string("split", _D.split, "Parity split.")
_PARITY_EXAMPLES = flags.DEFINE_integer(
    "parity_examples", _D.parity_examples, "Parity records (0: all).")
_OPSET = flags.DEFINE_integer("opset", _D.opset, "ONNX opset (>= 21).")
_DATA_DIR = flags.DEFINE_string("data_dir", "",
                                "TFDS data_dir (default: the run's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "",
                                  "Raw-data folder (default: the run's).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  options = builder.Options(
      precisions=tuple(_PRECISIONS.value), batch=_BATCH.value,
      checkpoint=_CHECKPOINT.value, calibration_examples=_CALIBRATION.value,
      calibration_method=_CALIBRATION_METHOD.value,
      reduce_range=_REDUCE_RANGE.value, split=_SPLIT.value,
      parity_examples=_PARITY_EXAMPLES.value, opset=_OPSET.value,
      data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value)
  try:
    report = builder.export(_WORKDIR.value, _OUT.value, options)
  except (trained_lib.ExportError, FileNotFoundError) as e:
    sys.exit(f"Export error: {e}")
  print(f"{report['model']} ({report['block']}) exported ({_FORMAT.value}); "
        f"parity on {report['variants'][options.precisions[0]]['n']} "
        f"{report['parity_split']} records (reference macro-AUC "
        f"{report['variants'][options.precisions[0]]['reference_macro_auc']:.4f}"
        "):")
  print(builder.table(report))
  missed = builder.missed(report)
  if missed:
    sys.exit(f"{', '.join(missed)} missed the parity bound (see the table).")


if __name__ == "__main__":
  app.run(main)
