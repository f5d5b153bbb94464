r"""Full train-step cost of task-only, KD and EVL (and EVL without each term).

  python benchmarks/speed.py --out=workdir/benchmarks [--size=tiny]

Times the pmapped train step (teacher forward + student forward/backward +
losses + update; after compilation, `block_until_ready` on the metrics),
interleaved in one process, for: the teacher and the student on the task
loss, the student distilled by logit KD, by EVL, by EVL without MHCA /
without OT / without relation, by OT alone, and KD and EVL with the
teacher's outputs read from the feature cache (as benchmarks/kd_table.py
trains). Reports examples/s, EVL step / KD step (online and cached
teacher), OT's share of the EVL step (1 − without-OT / EVL), the
aligner's share (MHCA and relation share the aligner: 1 − OT-alone / EVL),
and model-FLOPs utilisation: model FLOPs per step (3 x student forward +
teacher forward, from `models.flops_per_example`, per example) / step time,
against the dense f32 matmul FLOP/s measured on the same device in the same
run. Writes speed.json and speed.md; the ratios are the result, since
absolute numbers depend on the (noisy) machine.
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
from evl_ecg_jax.train import build  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import optim  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import runner  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.train import step as step_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_SIZE = flags.DEFINE_string("size", "tiny", "Config size variant.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per case.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds.")


def _case(config, trained, teacher_block, cached=False):
  """(step callable taking no args, batch size) for one configuration.

  `cached`: the batch carries the teacher's outputs (as read from
  train/teacher_store.py's cache), so the step skips the teacher forward.
  """
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
  objective = losses.build_objective(
      alpha=config.loss.alpha if teacher else 0.0, terms=config.loss.terms,
      taps=config.loss.taps, shuffle_teacher=config.loss.shuffle_teacher)
  tx = optim.make(config.optim, 1000)
  run = runner.Pmap()
  state = run.init_state(build.state_initializer(model, tx, config, x,
                                                objective, teacher),
                         jax.random.PRNGKey(0))
  p_step = run.train_step(functools.partial(
      step_lib.train_step, model=model, teacher=teacher, tx=tx,
      objective=objective))
  holder = {"state": state}
  if cached:
    taps = objective.model_taps("teacher")
    logits, feats = teacher.apply(
        {"params": teacher_params}, batch["ecg"].reshape((-1, 1000, 12)),
        taps=taps)
    batch = dict(batch, **parallel.split_batch(
        {"teacher/logits": np.asarray(logits),
         **{f"teacher/{t}": np.asarray(feats[t]) for t in taps}}, n_dev))
  teacher_params = parallel.replicate(teacher_params)

  def one_step():
    holder["state"], metrics = p_step(holder["state"], teacher_params, batch)
    return metrics
  return one_step, batch_size


def _matmul_flops_per_second(n=1024, calls=20):
  """Dense f32 matmul FLOP/s of the first local device (2·n³ per call)."""
  x = jax.device_put(np.ones((n, n), np.float32), jax.local_devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  seconds = _timing.time_interleaved({"matmul": lambda: matmul(x)},
                                     calls=calls, repeats=3)["matmul"]
  return 2 * n**3 / seconds


def _model_flops(config, trained, teacher_block, cached=False):
  """Model FLOPs of one example's step: 3 x forward of the trained model
  (forward + backward) + the teacher's forward (unless cached)."""
  shape = (1, 10 * config.data.sampling_rate, 12)
  flops = 3 * models.flops_per_example(models.get(config[trained], 5), shape)
  if teacher_block and not cached:
    flops += models.flops_per_example(models.get(config[teacher_block], 5),
                                      shape)
  return flops


def main(argv):
  del argv
  get = lambda loss: default.get_config(f"size={_SIZE.value},loss={loss}")
  specs = {  # case -> (config, trained block, teacher block)
      "teacher, task loss": (get("ce"), "teacher", None),
      "student, task loss": (get("ce"), "student", None),
      "student, KD": (get("kd"), "student", "teacher"),
      "student, EVL": (get("evl"), "student", "teacher"),
      "student, EVL without MHCA": (get("evl_no_mhca"), "student", "teacher"),
      "student, EVL without OT": (get("evl_no_ot"), "student", "teacher"),
      "student, EVL without relation": (get("evl_no_rel"), "student",
                                        "teacher"),
  }
  for loss in ("KD", "EVL"):
    specs[f"student, {loss}, cached teacher"] = (get(loss.lower()), "student",
                                                 "teacher", True)
  ot_only = get("evl")
  ot_only.loss.terms.mhca.weight = ot_only.loss.terms.relation.weight = 0.0
  specs["student, OT alone"] = (ot_only, "student", "teacher")
  cases = {name: _case(*spec) for name, spec in specs.items()}
  times = _timing.time_interleaved(
      {name: run for name, (run, _) in cases.items()}, calls=_STEPS.value,
      repeats=_REPEATS.value)
  peak = _matmul_flops_per_second()
  n_dev = jax.local_device_count()
  evl = times["student, EVL"]
  result = {"size": _SIZE.value, "steps": _STEPS.value,
            "repeats": _REPEATS.value, "devices": n_dev,
            "matmul_flops_per_second_per_device": peak, "rows": [],
            "evl_over_kd": evl / times["student, KD"],
            "ot_share_of_evl_step": 1 - times["student, EVL without OT"] / evl,
            "aligner_share_of_evl_step":
            1 - times["student, OT alone"] / evl}
  result["cached_over_online_evl"] = (times["student, EVL, cached teacher"]
                                      / evl)
  result["evl_over_kd_cached"] = (times["student, EVL, cached teacher"]
                                  / times["student, KD, cached teacher"])
  for name, (_, batch_size) in cases.items():
    sec = times[name]
    flops = _model_flops(*specs[name]) * batch_size / sec
    result["rows"].append({
        "case": name, "seconds_per_step": sec,
        "examples_per_second": batch_size / sec,
        "cost_vs_student_task_loss": sec / times["student, task loss"],
        "model_flops_per_second": flops, "mfu": flops / (peak * n_dev)})
  print(_timing.write_report(
      _OUT.value, "speed", result,
      ["case", "s/step", "examples/s", "cost vs student CE",
       "model-FLOPs utilisation"], _table(result)))


def _table(result):
  """The markdown rows of speed.md: one per case, then the ratios."""
  rows = [[r["case"], f"{r['seconds_per_step']:.4f}",
           f"{r['examples_per_second']:.1f}",
           f"{r['cost_vs_student_task_loss']:.2f}x", f"{r['mfu']:.1%}"]
          for r in result["rows"]]
  for label, value in (
      ("EVL step / KD step", f"{result['evl_over_kd']:.2f}x"),
      ("EVL step / KD step, cached teacher",
       f"{result['evl_over_kd_cached']:.2f}x"),
      ("OT's share of the EVL step", f"{result['ot_share_of_evl_step']:.0%}"),
      ("the aligner's (MHCA + relation) share",
       f"{result['aligner_share_of_evl_step']:.0%}"),
      ("EVL step, cached / online teacher",
       f"{result['cached_over_online_evl']:.2f}x"),
      ("dense f32 matmul, GFLOP/s per device",
       f"{result['matmul_flops_per_second_per_device'] / 1e9:.1f}")):
    rows.append([label, value, "", "", ""])
  return rows


if __name__ == "__main__":
  app.run(main)
