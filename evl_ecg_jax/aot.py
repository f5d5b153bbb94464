r"""Ahead-of-time compile of the real train step for a TPU slice, on a CPU host.

  pip install -e '.[tpu]'   # libtpu matching the installed jax
  python -m evl_ecg_jax.aot --config=configs/scale.py:pair=7b_2b \
      --topology=v5e:2x2 [--batch_size=64] [--json=out.json]

Builds the config's teacher, student and objective, lowers the
`parallel=spmd` step (train/runner.py: params, optimizer state and the
frozen teacher sharded by the logical rules on the config's mesh, state
donated) for the TPU devices of `jax.experimental.topologies`, compiles it
with libtpu, and prints per-chip HBM (arguments, outputs, temporaries,
peak) against the chip's HBM, the FLOPs of one step and the step time they
imply at 100 % and 40 % of the slice's peak. Exits 1 with a message when
the step does not fit (XLA's out-of-memory, or a peak above the HBM).

FLOPs: XLA's cost analysis counts a loop body once (Sinkhorn's iterations,
an implicit-gradient solve), so the step's FLOPs are counted as model
FLOPs: B x (3 x student forward + teacher forward) from
`models.flops_per_example` (loop-free lowerings, exact), plus the objective
and its gradient from the cost analysis of the loss alone, with Sinkhorn
bounded at `ot_max_iterations` (6 FLOPs per cost entry per iteration for
the two log-sum-exp updates). XLA's own count of the compiled step is
printed next to it (it includes remat's recomputed forward).
"""

from __future__ import annotations

import json
import os
import sys

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
  loss = config.loss
  if not (loss.alpha > 0 and loss.ot_weight > 0):
    return 0.0
  return 6.0 * batch * n_teacher * n_student * loss.ot_max_iterations


def compile_step(config, topology_name: str, batch_size: int = 0,
                 hbm_gib: float = 0.0) -> dict:
  """Lowers + compiles the spmd train step; returns the report dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import losses  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import loop  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import runner as runner_lib  # pylint: disable=g-import-not-at-top

  if config.parallel != "spmd" or config.mode != "distill":
    raise ValueError(f"config.parallel={config.parallel!r}, config.mode="
                     f"{config.mode!r}: the AOT tool compiles the distill "
                     "step under parallel=spmd (configs/scale.py).")
  topo, devices = tpu_devices(topology_name)
  batch = batch_size or config.data.batch_size
  samples = 10 * config.data.sampling_rate
  shape = (batch, samples, 12)
  example = jnp.zeros((1, samples, 12), jnp.float32)
  objective = losses.make_objective(**dict(config.loss))
  student, teacher = loop.build_models(config, objective, example.shape)
  # The runner and the step training uses, on the topology's devices.
  run = runner_lib.make(config, devices=devices)
  init, step_fn, teacher_abstract = loop.step_parts(config, student, teacher,
                                                    objective, example)
  target = run.state_target(jax.eval_shape(init, jax.random.PRNGKey(0)))
  step = run.train_step(step_fn, target, teacher_abstract)
  lowered = step.lower(target, run.teacher_target(teacher_abstract),
                       run.batch_target({
                           "ecg": jax.ShapeDtypeStruct(shape, jnp.float32),
                           "labels": jax.ShapeDtypeStruct(
                               (batch, len(config.data.class_names)),
                               jnp.float32)}))
  mesh = run.mesh
  report = {"topology": topology_name, "chips": topo.num_chips,
            "accelerator_type": topo.accelerator_type,
            "mesh": dict(mesh.shape), "batch_size": batch,
            "teacher_params": models.count_params(teacher, shape),
            "student_params": models.count_params(student, shape),
            "hbm_per_chip_gib": hbm_gib or topo.chip.hbm_gib}
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "memory" not in str(e).lower():
      raise
    report.update(fits=False, error=str(e).splitlines()[0][:500])
    return report
  mem = compiled.memory_analysis()
  gib = 1024.0**3
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  report.update(
      arguments_gib=mem.argument_size_in_bytes / gib,
      outputs_gib=mem.output_size_in_bytes / gib,
      aliased_gib=mem.alias_size_in_bytes / gib,
      temporaries_gib=mem.temp_size_in_bytes / gib,
      peak_gib=peak / gib, fits=peak / gib <= report["hbm_per_chip_gib"])
  report.update(_flops(config, batch, student, teacher, objective, example,
                       compiled, topo))
  return report


def _flops(config, batch, student, teacher, objective, example, compiled,
           topo) -> dict:
  """Model FLOPs of one step (see the module docstring) and step times."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  s_fwd = models.flops_per_example(student, example.shape)
  t_fwd = models.flops_per_example(teacher, example.shape)
  taps_s, taps_t = (objective.model_taps("student"),
                    objective.model_taps("teacher"))
  s_out = jax.eval_shape(lambda x: student.init_with_output(
      jax.random.PRNGKey(0), x, taps=taps_s)[0], example)
  t_out = jax.eval_shape(lambda x: teacher.init_with_output(
      jax.random.PRNGKey(0), x, taps=taps_t)[0], example)
  grow = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype), t)
  s_out, t_out = grow(s_out), grow(t_out)
  labels = jax.ShapeDtypeStruct((batch, len(config.data.class_names)),
                                jnp.float32)
  heads = None
  if objective.heads is not None:
    heads = jax.eval_shape(lambda s, t: objective.init_heads(
        jax.random.PRNGKey(0), s, t), s_out[1], t_out[1])
  loss_grad = jax.jit(jax.grad(
      lambda h, s, t, y: objective(h, s, t, y)[0], argnums=(0, 1)))
  loss_flops = float(loss_grad.lower(heads, s_out, t_out, labels)
                     .cost_analysis()["flops"])
  tokens = lambda out, tap: out[1][tap].shape[1] if tap in out[1] else 0
  ot = _sinkhorn_flops(config, batch,
                       tokens(t_out, config.loss.teacher_ot_tap),
                       tokens(s_out, config.loss.student_ot_tap))
  model = batch * (3 * s_fwd + t_fwd) + loss_flops + ot
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  peak = topo.num_chips * topo.chip.bf16_tflops * 1e12
  return {"model_flops_per_step": model,
          "student_fwd_flops_per_example": s_fwd,
          "teacher_fwd_flops_per_example": t_fwd,
          "loss_flops_per_step": loss_flops + ot,
          "sinkhorn_flops_bound": ot,
          "xla_flops_per_step": float(xla.get("flops", 0.0)) * topo.num_chips,
          "peak_bf16_flops_per_s": peak,
          "step_s_at_100pct": model / peak,
          f"step_s_at_{int(_MFU * 100)}pct": model / (_MFU * peak)}


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_report(r: dict) -> str:
  lines = [f"{r['topology']} ({r['accelerator_type']}, {r['chips']} chips), "
           f"mesh {r['mesh']}, global batch {r['batch_size']}",
           f"teacher {_count(r['teacher_params'])} params (frozen), student "
           f"{_count(r['student_params'])}"]
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
  return "\n".join(lines)


def main(argv):
  del argv
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
