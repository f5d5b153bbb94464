r"""Input-pipeline throughput against the student train step's consumption.

  python benchmarks/pipeline.py --out=workdir/benchmarks \
      [--data_dir=workdir/demo/tfds] [--ptbxl_dir=../shared/data/ptbxl]

Examples/s drawn from `pipeline.train_iterator` (batch 32, host-local) for
the synthetic 100 Hz set and, if --ptbxl_dir exists, PTB-XL (folds=shared),
without and with transforms (band-pass + standardize + scale, noise, lead
dropout), next to the examples/s the pmapped student step consumes (task
loss and EVL; teacher forward included), measured in the same run. Writes
pipeline.json and pipeline.md.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import speed  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# --out, --size, --steps (batches per round here) and --repeats come from
# speed.
_DATA_DIR = flags.DEFINE_string("data_dir", "workdir/demo/tfds",
                                "TFDS data_dir (built on first use).")
_PTBXL_DIR = flags.DEFINE_string("ptbxl_dir", "../shared/data/ptbxl",
                                 "PTB-XL manual_dir; skipped if missing.")
_BATCHES = 50  # batches per timed pipeline call
AUGMENT = dict(bandpass_hz=(0.5, 40.0), standardize=True, scale=0.1,
               noise_std=0.05, lead_dropout=0.1)


def _source_cases():
  datasets = {"synthetic 100 Hz": "data=synthetic"}
  if os.path.exists(os.path.join(_PTBXL_DIR.value, "ptbxl_database.csv")):
    datasets["PTB-XL 100 Hz"] = "data=ptbxl,folds=shared"
  cases = {}
  for name, arg in datasets.items():
    for label, transforms in (("raw", {}), ("transforms", AUGMENT)):
      config = default.get_config(arg)
      config.data.data_dir = _DATA_DIR.value
      config.data.manual_dir = "" if "synthetic" in arg else _PTBXL_DIR.value
      config.data.transforms.update(transforms)
      it = pipeline.train_iterator(config.data)
      # Many batches per call, so the read-ahead buffer
      # (pipeline.PREFETCH_BATCHES) cannot pass for throughput.
      cases[f"pipeline: {name}, {label}"] = (
          lambda it=it: [next(it) for _ in range(_BATCHES)][-1],
          config.data.batch_size * _BATCHES)
  return cases


def main(argv):
  del argv
  get = lambda loss: default.get_config(
      f"size={speed._SIZE.value},loss={loss}")  # pylint: disable=protected-access
  cases = _source_cases()
  cases["student step, task loss"] = speed._case(  # pylint: disable=protected-access
      get("ce"), "student", None)
  cases["student step, EVL"] = speed._case(  # pylint: disable=protected-access
      get("evl"), "student", "teacher")
  times = _timing.time_interleaved(
      {name: fn for name, (fn, _) in cases.items()},
      calls=speed._STEPS.value, repeats=speed._REPEATS.value)  # pylint: disable=protected-access
  rate = {name: batch / times[name] for name, (_, batch) in cases.items()}
  need = rate["student step, task loss"]
  rows = [[name, f"{r:,.0f}", f"{r / need:.2f}x"] for name, r in rate.items()]
  print(_timing.write_report(
      speed._OUT.value, "pipeline",  # pylint: disable=protected-access
      {"examples_per_second": rate, "augment": AUGMENT},
      ["case", "examples/s", "vs student task-loss step"], rows))


if __name__ == "__main__":
  app.run(main)
