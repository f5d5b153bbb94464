r"""Ahead-of-time compile of the real train step for a TPU slice, on a CPU host.

  pip install -e '.[tpu]'   # libtpu matching the installed jax
  python -m evl_ecg_jax.aot --config=configs/scale.py:pair=7b_2b \
      --topology=v5e:2x2 [--batch_size=64] [--max_batch] [--json=out.json]
  python -m evl_ecg_jax.aot \
      --config=configs/vlm.py:size=2b,mode=distill,parallel=spmd \
      --topology=v5p:2x2x2 --max_batch

Builds the config's teacher, student and objective, lowers the
`parallel=spmd` step (train/runner.py: params, optimizer state and the
frozen teacher sharded by the logical rules on the config's mesh, state
donated) for the TPU devices of `jax.experimental.topologies`, compiles it
with libtpu, and prints per-chip HBM (arguments, outputs, temporaries,
peak) against the chip's HBM, the FLOPs of one step and the step time they
imply at 100 % and 40 % of the slice's peak. Exits 1 with a message when
the step does not fit (XLA's out-of-memory, or a peak above the HBM).
`--max_batch` searches the largest global batch that fits (`max_batch`).
`--config.xla_optimization_level=O1` compiles as a run with that field
trains (a faster compile; its memory is reported for that level only).
Signal configs (configs/scale.py) and VLM ones (configs/vlm.py: the batch
is an image and both tokenizers' sequences of config.vlm.max_len, at the
vocabulary sizes the config asks its tokenizers for).

FLOPs: XLA's cost analysis counts a loop body once (Sinkhorn's iterations,
an implicit-gradient solve), so the step's FLOPs are counted as model
FLOPs: B x (3 x student forward + teacher forward) from
`models.flops_per_example` (loop-free lowerings, exact), plus the objective
and its gradient from the cost analysis of the loss alone, with Sinkhorn
bounded at `terms.ot.max_iterations` (6 FLOPs per cost entry per iteration for
the two log-sum-exp updates). XLA's own count of the compiled step is
printed next to it (it includes remat's recomputed forward; with scanned
stacks it counts each stack's body once). For a VLM the model FLOPs are
the forwards only (B x (3 x student + teacher)).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/scale.py:pair=7b_2b.",
    lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2",
                                "TPU topology, e.g. v5e:4x4, v5p:2x2x2.")
_BATCH = flags.DEFINE_integer("batch_size", 0,
                              "Global batch (0: config.data.batch_size).")
_JSON = flags.DEFINE_string("json", "", "Also write the report here.")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM budget per chip in GiB (0: "
                          "the chip's; less keeps headroom).")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Search the largest global batch that fits "
    "(doubling from --batch_size, then bisecting; see max_batch).")
_MAX_BATCH_LIMIT = flags.DEFINE_integer(
    "max_batch_limit", 65536, "Largest batch --max_batch tries.")
_MFU = 0.4  # the "realistic" utilisation the report quotes


def tpu_devices(topology_name: str):
  """TPU devices of `topology_name` (no TPU needed; libtpu compiles)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import tpu  # pylint: disable=g-import-not-at-top
  topo = tpu.topology(topology_name)
  try:
    desc = topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology_name)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"--topology={topology_name}: libtpu could not describe it ({e}). "
        "Install the [tpu] extra (libtpu matching jax).") from e
  return topo, desc.devices


def _sinkhorn_flops(config, batch, n_teacher, n_student) -> float:
  ot = config.loss.terms.ot
  if not (config.loss.alpha > 0 and ot.weight > 0):
    return 0.0
  return 6.0 * batch * n_teacher * n_student * ot.max_iterations


def _parts(config, batch: int):
  """(student, teacher, objective, task, example of one record, {name:
  ShapeDtypeStruct} of the global batch) of a signal or VLM config."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import build  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  objective = build.objective(config)
  if config.get("model_kind", "signal") == "vlm":
    from evl_ecg_jax.vlm import data as vlm_data  # pylint: disable=g-import-not-at-top
    from evl_ecg_jax.vlm import fit as vlm_fit  # pylint: disable=g-import-not-at-top
    from evl_ecg_jax.vlm import task as vlm_task  # pylint: disable=g-import-not-at-top
    vlm_fit.check(config)
    size = tuple(config.vlm.image_size)
    # The vocabularies the config asks its tokenizers for.
    student, teacher = (vlm_fit.build_model(
        config[b], config[b].vocab_size, field=b, image_size=size)
                        for b in ("student", "teacher"))
    shapes = vlm_data.batch_shapes(size, config.vlm.max_len, batch)
    example = {k: jnp.zeros((1,) + s.shape[1:], s.dtype)
               for k, s in shapes.items()}
    return (student, teacher, objective, vlm_task.VLMTask("student"),
            example, shapes)
  samples = 10 * config.data.sampling_rate
  example = jnp.zeros((1, samples, 12), jnp.float32)
  student, teacher = build.build_models(config, objective, example.shape)
  shapes = {"ecg": jax.ShapeDtypeStruct((batch, samples, 12), jnp.float32),
            "labels": jax.ShapeDtypeStruct(
                (batch, len(config.data.class_names)), jnp.float32)}
  return student, teacher, objective, step_lib.SignalTask, example, shapes


def compile_step(config, topology_name: str, batch_size: int = 0,
                 hbm_gib: float = 0.0) -> dict:
  """Lowers + compiles the spmd train step; returns the report dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import cost  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import build  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import runner as runner_lib  # pylint: disable=g-import-not-at-top

  if config.parallel != "spmd" or config.mode != "distill":
    raise ValueError(f"config.parallel={config.parallel!r}, config.mode="
                     f"{config.mode!r}: the AOT tool compiles the distill "
                     "step under parallel=spmd (configs/scale.py, "
                     "configs/vlm.py:size=2b,mode=distill,parallel=spmd).")
  topo, devices = tpu_devices(topology_name)
  batch = batch_size or config.data.batch_size
  start = time.perf_counter()
  student, teacher, objective, task, example, shapes = _parts(config, batch)
  run = runner_lib.make(config, devices=devices)  # training's, on the topology
  init, step_fn, teacher_abstract = build.step_parts(
      config, student, teacher, objective, example, task)
  target = run.state_target(jax.eval_shape(init, jax.random.PRNGKey(0)))
  step = run.train_step(step_fn, target, teacher_abstract)
  lowered = step.lower(target, run.teacher_target(teacher_abstract),
                       run.batch_target(shapes))
  lowered_at = time.perf_counter()
  count = lambda abstract: 0 if abstract is None else int(sum(
      x.size for x in jax.tree.leaves(abstract["params"])))  # None: no teacher
  report = {"topology": topology_name, "chips": topo.num_chips,
            "accelerator_type": topo.accelerator_type,
            "mesh": dict(run.mesh.shape), "batch_size": batch,
            "scan": {role: getattr(m, "scan", False) for role, m in
                     (("teacher", teacher), ("student", student))},
            "teacher_params": count(teacher_abstract),
            "student_params": count({"params": target.params["model"]}),
            "hbm_per_chip_gib": hbm_gib or topo.chip.hbm_gib,
            "xla_optimization_level":
                config.get("xla_optimization_level", "") or "default",
            "lower_s": lowered_at - start}
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "memory" not in str(e).lower():
      raise
    report.update(fits=False, error=str(e).splitlines()[0][:500],
                  compile_s=time.perf_counter() - lowered_at)
    return report
  report["compile_s"] = time.perf_counter() - lowered_at
  report.update(_memory(compiled, report["hbm_per_chip_gib"]))
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  report["xla_flops_per_step"] = float(xla.get("flops", 0.0)) * topo.num_chips
  report.update(_flops(config, batch, student, teacher, objective, task,
                       example))
  if not isinstance(example, dict) and teacher is not None:
    report["batch_shards"] = run.batch_shards
    report["cross_record_bytes"] = cost.cross_record_bytes(
        objective, cost.loss_shapes(config, batch, student, teacher,
                                    objective, example), run.batch_shards)
  report.update(_step_times(report["model_flops_per_step"], topo))
  return report


def _step_times(flops, topo) -> dict:
  """Step time at 100 % and at _MFU of the topology's bf16 peak."""
  peak = topo.num_chips * topo.chip.bf16_tflops * 1e12
  return {"peak_bf16_flops_per_s": peak, "step_s_at_100pct": flops / peak,
          f"step_s_at_{int(_MFU * 100)}pct": flops / (_MFU * peak)}


def _memory(compiled, hbm_gib) -> dict:
  """The compiled step's memory per chip (GiB) and whether it fits."""
  mem = compiled.memory_analysis()
  gib = 1024.0**3
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib
  return dict(arguments_gib=mem.argument_size_in_bytes / gib,
              outputs_gib=mem.output_size_in_bytes / gib,
              aliased_gib=mem.alias_size_in_bytes / gib,
              temporaries_gib=mem.temp_size_in_bytes / gib,
              peak_gib=peak, fits=peak <= hbm_gib)


def _flops(config, batch, student, teacher, objective, task,
           example) -> dict:
  """Model FLOPs of one step (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import cost  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  s_fwd, t_fwd = (0 if m is None else models.flops_per_example(
      m, inputs=task.inputs(example if isinstance(example, dict) else
                            {"ecg": example}, role))
                  for m, role in ((student, "student"), (teacher, "teacher")))
  if isinstance(example, dict) or teacher is None:
    # A VLM, or the task loss alone: the forwards only.
    return {"model_flops_per_step": batch * (3 * s_fwd + t_fwd),
            "student_fwd_flops_per_example": s_fwd,
            "teacher_fwd_flops_per_example": t_fwd}
  heads, s_out, t_out, labels = cost.loss_shapes(config, batch, student,
                                                teacher, objective, example)
  loss_grad = jax.jit(jax.grad(
      lambda h, s, t, y: objective(h, s, t, y)[0], argnums=(0, 1)))
  loss_flops = float(loss_grad.lower(heads, s_out, t_out, labels)
                     .cost_analysis()["flops"])
  tokens = lambda out, tap: out[1][tap].shape[1] if tap in out[1] else 0
  ot = _sinkhorn_flops(config, batch,
                       tokens(t_out, config.loss.taps.teacher_ot),
                       tokens(s_out, config.loss.taps.student_ot))
  return {"model_flops_per_step": batch * (3 * s_fwd + t_fwd) + loss_flops
                                  + ot,
          "student_fwd_flops_per_example": s_fwd,
          "teacher_fwd_flops_per_example": t_fwd,
          "loss_flops_per_step": loss_flops + ot,
          "sinkhorn_flops_bound": ot}


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_report(r: dict) -> str:
  scanned = [k for k, v in r["scan"].items() if v]
  lines = [f"{r['topology']} ({r['accelerator_type']}, {r['chips']} chips), "
           f"mesh {r['mesh']}, global batch {r['batch_size']}",
           (f"teacher {_count(r['teacher_params'])} params (frozen), "
            if r["teacher_params"] else "no teacher (task loss only), ") +
           "student "
           f"{_count(r['student_params'])}; scanned stacks: "
           f"{', '.join(scanned) or 'none'}; lowered in {r['lower_s']:.0f} s,"
           f" compiled in {r['compile_s']:.0f} s (XLA optimization level "
           f"{r['xla_optimization_level']})"]
  if "peak_gib" not in r:
    return "\n".join(lines + [f"DOES NOT FIT: {r.get('error')}"])
  lines += [
      f"HBM per chip: arguments {r['arguments_gib']:.3f} GiB, outputs "
      f"{r['outputs_gib']:.3f} (aliased {r['aliased_gib']:.3f}), "
      f"temporaries {r['temporaries_gib']:.3f}, peak {r['peak_gib']:.3f} "
      f"of {r['hbm_per_chip_gib']:.2f} GiB -> "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"FLOPs per step: model {r['model_flops_per_step']:.3e} (XLA's count "
      f"of the compiled step {r['xla_flops_per_step']:.3e})",
      f"step time: {r['step_s_at_100pct'] * 1e3:.3f} ms at 100 % of peak, "
      f"{r['step_s_at_40pct'] * 1e3:.3f} ms at 40 %"]
  if r.get("cross_record_bytes") is not None:
    moved = ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in sorted(
        r["cross_record_bytes"].items())) or "none"
    lines.append(f"cross-record collectives of the objective per device per "
                 f"step ({r['batch_shards']} batch shards, named-axis step): "
                 f"{moved}")
  return "\n".join(lines)


def max_batch(config, topology_name: str, start: int, hbm_gib: float = 0.0,
              limit: int = 65536,
              log=functools.partial(print, flush=True)) -> dict:
  """The largest global batch whose step fits, by compiling it.

  Doubles from `start` until a batch does not fit (or exceeds `limit`),
  then bisects between the last fit and the first miss down to a step of
  max(batch shards, fit // 8) (a batch must split over the mesh's batch
  axes). Returns {"max_batch", "first_miss", "probes": [reports]}.
  """
  probes = []

  def fits(batch):
    report = compile_step(config, topology_name, batch, hbm_gib)
    probes.append(report)
    log(f"  batch {batch}: " + (
        f"peak {report['peak_gib']:.2f} GiB" if "peak_gib" in report
        else "out of memory") + (" fits" if report["fits"] else " no") +
        f" (lower {report['lower_s']:.0f} s, compile "
        f"{report['compile_s']:.0f} s)")
    return report["fits"]

  lo, hi = 0, start
  while hi <= limit and fits(hi):
    lo, hi = hi, 2 * hi
  if lo == 0:
    return {"max_batch": 0, "first_miss": start, "probes": probes}
  mesh = probes[0]["mesh"]
  shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
  step = max(shards, lo // 8)
  while hi - lo > step and hi <= limit:
    mid = lo + (hi - lo) // 2 // step * step
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return {"max_batch": lo, "first_miss": hi if hi <= limit else None,
          "probes": probes}


def main(argv):
  del argv
  # Library logs (absl INFO) to log.txt beside --json (workdir/aot without
  # one); the report and warnings stay on the terminal.
  from evl_ecg_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet(os.path.dirname(os.path.abspath(_JSON.value)) if _JSON.value
                else os.path.join("workdir", "aot"))
  if _MAX_BATCH.value:
    start = _BATCH.value or _CONFIG.value.data.batch_size
    found = max_batch(_CONFIG.value, _TOPOLOGY.value, start, _HBM.value,
                      _MAX_BATCH_LIMIT.value)
    best = [r for r in found["probes"] if r["batch_size"] ==
            found["max_batch"]]
    print(format_report(best[0]) if best else "no batch fits", flush=True)
    print(f"largest global batch that fits on {_TOPOLOGY.value}: "
          f"{found['max_batch']} (first miss: {found['first_miss']})",
          flush=True)
    report = {**(best[0] if best else {}), **found}
  else:
    report = compile_step(_CONFIG.value, _TOPOLOGY.value, _BATCH.value,
                          _HBM.value)
    print(format_report(report), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  if not report.get("fits"):
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
