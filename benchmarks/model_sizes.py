r"""Parameters, FLOPs and memory per model preset (no allocation, CPU only).

  python benchmarks/model_sizes.py --out=workdir/benchmarks

For every family x size preset (evl_ecg_jax/models/presets.py) at 100 Hz,
10 s, 12 leads, with the token geometry the config gives it as a student
(~64 tokens; ViT1D also as a teacher, ~256 tokens):
- params: `jax.eval_shape` of init (exact);
- GFLOPs: forward FLOPs per example from XLA's cost analysis;
- memory of training it: params + gradients in the param dtype (f32) and
  AdamW's two moments (f32), and of holding it as a frozen teacher in
  bfloat16 (no gradients, no optimizer state);
- activations per example: the growth of XLA:CPU's temporary buffers for
  `grad` of the model between batch 2 and batch 4, divided by 2. XLA:CPU
  ignores rematerialisation and keeps bf16 intermediates partly in f32, so
  this is an upper bound for an accelerator; the TPU ahead-of-time compile
  (issue 8) gives the HBM figure. Measured with the blocks unrolled (the
  2b/7b presets scan them; docs/scale.md compares both on TPU).
Writes model_sizes.json and model_sizes.md under --out.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.models import presets  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_ACTIVATIONS_UP_TO = flags.DEFINE_float(
    "activations_up_to", 1e10, "Compile for activation memory only up to "
    "this many parameters (the 7B compile takes ~1 min on 2 cores).")
ECG = (1, 1000, 12)
GIB = 2.0 ** 30


def _activation_bytes_per_example(model):
  if getattr(model, "scan", False):  # measured on the unrolled blocks
    model = model.clone(scan=False)
  params = nn.meta.unbox(models.abstract_variables(model, ECG))["params"]

  def loss(p, x):
    return model.apply({"params": p}, x, taps=())[0].sum()

  temp = []
  for batch in (2, 4):
    x = jax.ShapeDtypeStruct((batch,) + ECG[1:], jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    temp.append(compiled.memory_analysis().temp_size_in_bytes)
  return (temp[1] - temp[0]) / 2


def _row(family, size, role):
  cfg = default.get_config(f"size=tiny,{role}_size={size},teacher={family},"
                           f"model={family}")[role]
  model = models.get(cfg, 5)
  n = models.count_params(model, ECG)
  _, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x), models.abstract_variables(model, ECG),
      jax.ShapeDtypeStruct(ECG, jnp.float32))
  row = dict(model=family, size=size, role=role,
             tokens=int(feats["tokens"].shape[1]), params=n,
             gflops_per_example=models.flops_per_example(model, ECG) / 1e9,
             compute_dtype=cfg.dtype, remat=bool(cfg.get("remat", False)),
             train_params_grads_gib=2 * 4 * n / GIB,
             train_adamw_gib=2 * 4 * n / GIB,
             frozen_bf16_gib=2 * n / GIB, activations_mib_per_example=None)
  if n <= _ACTIVATIONS_UP_TO.value:
    row["activations_mib_per_example"] = (
        _activation_bytes_per_example(model) / 2 ** 20)
  return row


def main(argv):
  del argv
  rows = []
  for family in presets.PRESETS:
    for size in presets.sizes(family):
      roles = ("student", "teacher") if family == "vit1d" else ("student",)
      for role in roles:
        rows.append(_row(family, size, role))
        print(rows[-1], flush=True)
  header = ("model", "size", "as", "tokens", "params", "GFLOPs/example",
            "compute", "params+grads f32 (GiB)", "AdamW (GiB)",
            "frozen bf16 (GiB)", "activations/example, XLA:CPU bound (MiB)")
  act = lambda r: ("—" if r["activations_mib_per_example"] is None
                   else f"{r['activations_mib_per_example']:,.1f}")
  table = [(r["model"], r["size"], r["role"], str(r["tokens"]),
            f"{r['params']:,}", f"{r['gflops_per_example']:,.3f}",
            r["compute_dtype"] + (" + remat" if r["remat"] else ""),
            f"{r['train_params_grads_gib']:.3f}",
            f"{r['train_adamw_gib']:.3f}", f"{r['frozen_bf16_gib']:.3f}",
            act(r)) for r in rows]
  print(_timing.write_report(_OUT.value, "model_sizes", {
      "input": "1000 samples x 12 leads (10 s at 100 Hz)", "rows": rows},
                             header, table))


if __name__ == "__main__":
  app.run(main)
