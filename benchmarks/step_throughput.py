r"""Train-step throughput of the three demo runs, as ratios from one process.

  python benchmarks/step_throughput.py --out=workdir/benchmarks [--size=tiny]

Times the pmapped train step (after compilation, `block_until_ready` on the
metrics) for: teacher on the task loss, student on the task loss, and student
distilled from the frozen teacher (teacher forward + student step). Writes
step_throughput.json and a markdown table; the ratios are the result, since
absolute numbers depend on the (noisy) machine.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import optim  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import state as state_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import step as step_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_SIZE = flags.DEFINE_string("size", "tiny", "Config size variant.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per case.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds.")


def _case(config, trained, teacher_block):
  """(step callable taking no args, batch size) for one configuration."""
  n_dev = jax.local_device_count()
  batch_size = config.data.batch_size
  rng = np.random.default_rng(0)
  batch = parallel.split_batch({
      "ecg": rng.normal(size=(batch_size, 1000, 12)).astype(np.float32),
      "labels": (rng.random((batch_size, 5)) < 0.3).astype(np.float32)}, n_dev)
  model = models.get(config[trained], 5)
  x = batch["ecg"][0, :1]
  teacher = teacher_params = None
  if teacher_block:
    teacher = models.get(config[teacher_block], 5)
    teacher_params = teacher.init(jax.random.PRNGKey(1), x)["params"]
  tx = optim.make(config.optim, 1000)
  state = state_lib.TrainState.create(
      params={"model": model.init(jax.random.PRNGKey(0), x)["params"]},
      tx=tx, rng=jax.random.PRNGKey(2))
  p_step = parallel.pmap_train_step(functools.partial(
      step_lib.train_step, model=model, teacher=teacher, tx=tx,
      objective=losses.make_objective(alpha=0.5 if teacher else 0.0,
                                      kd_temperature=2.0)))
  holder = {"state": state}

  def run():
    holder["state"], metrics = p_step(holder["state"], teacher_params, batch)
    return metrics
  jax.block_until_ready(run())  # compile
  return run, batch_size


def main(argv):
  del argv
  config = default.get_config(f"size={_SIZE.value}")
  cases = {"teacher, task loss": _case(config, "teacher", None),
           "student, task loss": _case(config, "student", None),
           "student, distilled (KD)": _case(config, "student", "teacher")}
  times = {name: [] for name in cases}
  for _ in range(_REPEATS.value):  # interleaved, so drift hits all cases
    for name, (run, _) in cases.items():
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        metrics = run()
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / _STEPS.value)
  base = float(np.median(times["student, task loss"]))
  rows = []
  for name, (_, batch_size) in cases.items():
    sec = float(np.median(times[name]))
    rows.append({"case": name, "seconds_per_step": sec,
                 "examples_per_second": batch_size / sec,
                 "cost_vs_student_task_loss": sec / base})
  os.makedirs(_OUT.value, exist_ok=True)
  result = {"size": _SIZE.value, "devices": jax.local_device_count(),
            "backend": jax.default_backend(), "steps": _STEPS.value,
            "repeats": _REPEATS.value, "rows": rows}
  with open(os.path.join(_OUT.value, "step_throughput.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = ["| case | s/step | examples/s | cost vs student CE |",
           "|---|---|---|---|"]
  table += [f"| {r['case']} | {r['seconds_per_step']:.4f} | "
            f"{r['examples_per_second']:.1f} | "
            f"{r['cost_vs_student_task_loss']:.2f}x |" for r in rows]
  text = "\n".join(table)
  with open(os.path.join(_OUT.value, "step_throughput.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
