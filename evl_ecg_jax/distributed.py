"""The multi-host flags of the command-line entry points, and the
`jax.distributed.initialize()` call they ask for."""

from __future__ import annotations

from absl import flags

_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() (multi-host). On Cloud TPU VMs the "
    "coordinator and process ids come from the TPU metadata; elsewhere set "
    "the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id (multi-host).")


def initialize() -> None:
  """jax.distributed.initialize() with the flags, if --jax_distributed."""
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
