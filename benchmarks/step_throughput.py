r"""Train-step throughput of the three demo runs, as ratios from one process.

  python benchmarks/step_throughput.py --out=workdir/benchmarks [--size=tiny]

Times the pmapped train step (after compilation, `block_until_ready` on the
metrics) for: teacher on the task loss, student on the task loss, student
distilled from the frozen teacher with logit KD, with EVL and with EVL
without OT (teacher forward + student step + losses). Reports EVL step / KD
step and OT's share of the EVL step. Writes step_throughput.json and a
markdown table; the ratios are the result, since absolute numbers depend on
the (noisy) machine.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import loop  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import optim  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
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
    teacher_params = models.init_params(teacher, jax.random.PRNGKey(1), x)
  objective = losses.make_objective(**dict(
      config.loss, alpha=config.loss.alpha if teacher else 0.0))
  tx = optim.make(config.optim, 1000)
  state = loop._init_state(model, tx, config, x, objective, teacher)  # pylint: disable=protected-access
  p_step = parallel.pmap_train_step(functools.partial(
      step_lib.train_step, model=model, teacher=teacher, tx=tx,
      objective=objective))
  holder = {"state": parallel.replicate(state)}
  teacher_params = parallel.replicate(teacher_params)

  def run():
    holder["state"], metrics = p_step(holder["state"], teacher_params, batch)
    return metrics
  return run, batch_size


def main(argv):
  del argv
  get = lambda loss: default.get_config(f"size={_SIZE.value},loss={loss}")
  cases = {"teacher, task loss": _case(get("ce"), "teacher", None),
           "student, task loss": _case(get("ce"), "student", None),
           "student, distilled (KD)": _case(get("kd"), "student", "teacher"),
           "student, EVL": _case(get("evl"), "student", "teacher"),
           "student, EVL without OT": _case(get("evl_no_ot"), "student",
                                            "teacher")}
  times = _timing.time_interleaved(
      {name: run for name, (run, _) in cases.items()}, calls=_STEPS.value,
      repeats=_REPEATS.value)
  base = times["student, task loss"]
  result = {"size": _SIZE.value, "steps": _STEPS.value,
            "repeats": _REPEATS.value, "rows": [], "evl_over_kd":
            times["student, EVL"] / times["student, distilled (KD)"],
            "ot_share_of_evl_step":
            1 - times["student, EVL without OT"] / times["student, EVL"]}
  for name, (_, batch_size) in cases.items():
    sec = times[name]
    result["rows"].append({"case": name, "seconds_per_step": sec,
                           "examples_per_second": batch_size / sec,
                           "cost_vs_student_task_loss": sec / base})
  rows = [[r["case"], f"{r['seconds_per_step']:.4f}",
           f"{r['examples_per_second']:.1f}",
           f"{r['cost_vs_student_task_loss']:.2f}x"] for r in result["rows"]]
  rows.append(["EVL step / KD step", f"{result['evl_over_kd']:.2f}x", "", ""])
  rows.append(["OT's share of the EVL step",
               f"{result['ot_share_of_evl_step']:.0%}", "", ""])
  print(_timing.write_report(
      _OUT.value, "step_throughput", result,
      ["case", "s/step", "examples/s", "cost vs student CE"], rows))


if __name__ == "__main__":
  app.run(main)
