r"""Paper-scale distillation on a TPU slice: a 7B teacher into a 2B student.

  python -m evl_ecg_jax.aot --config=configs/scale.py:pair=7b_2b,batch=64 \
      --topology=v5e:2x2
  python launch/tpu.py --name=evl --zone=ZONE --topology=v5e:4x4 --queued \
      --config=configs/scale.py:pair=7b_2b,batch=256 \
      --workdir=gs://BUCKET/evl-7b2b all

Variants: pair=7b_2b|2b_large|tiny (teacher_student sizes of the vit1d
family; tiny is the CPU/CI check), batch=<global batch>, accum=<gradient
accumulation steps>, mesh=fsdp|data_fsdp|fsdp_tensor (all chips on the fsdp
axis; 2-way data x the rest fsdp; the rest fsdp x 4-way tensor), loss and
data as in configs/default.py. Everything else is configs/default.py with
parallel=spmd and the EVL objective; docs/scale.md has the numbers.
"""

from configs import default
from evl_ecg_jax import config as config_lib

_PAIRS = {"7b_2b": ("7b", "2b"), "2b_large": ("2b", "large"),
          "tiny": ("tiny", "tiny")}
_MESHES = {"fsdp": (1, -1, 1), "data_fsdp": (2, -1, 1),
           "fsdp_tensor": (1, -1, 4)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, pair="7b_2b", batch=64, accum=1,
                             mesh="fsdp", loss="evl", data="synthetic",
                             mode="distill")
  for name, known in (("pair", _PAIRS), ("mesh", _MESHES)):
    if arg[name] not in known:
      raise config_lib.ConfigError(
          f"Config variant {name}={arg[name]!r}: expected one of "
          f"{sorted(known)}.")
  teacher, student = _PAIRS[arg.pair]
  config = default.get_config(
      f"mode={arg.mode},teacher=vit1d,model=vit1d,teacher_size={teacher},"
      f"student_size={student},loss={arg.loss},data={arg.data},"
      "parallel=spmd")
  config.data.batch_size = arg.batch
  config.data.eval_batch_size = arg.batch
  config.grad_accum_steps = arg.accum
  config.sharding.mesh_shape = _MESHES[arg.mesh]
  config.student.dropout = config.teacher.dropout = 0.0
  config.total_steps = 10_000
  config.optim.warmup_steps = 500
  return config
