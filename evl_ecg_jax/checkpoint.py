"""Orbax checkpoints in `<workdir>/checkpoints`: train state + data iterator.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash never leaves a checkpoint that restore would pick up.
"""

from __future__ import annotations

import os

from etils import epath
import jax
import orbax.checkpoint as ocp


def directory(workdir: str) -> str:
  """`<workdir>/checkpoints`; a URL workdir (gs://...) is kept as is."""
  if "://" not in workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
  return workdir.rstrip("/") + "/checkpoints"


def latest_step(workdir: str) -> int | None:
  """Latest finished checkpoint step in `workdir`, or None."""
  if not epath.Path(directory(workdir)).is_dir():
    return None
  steps = ocp.utils.checkpoint_steps(directory(workdir))  # finalised only
  return max(steps) if steps else None


def has_checkpoint(workdir: str) -> bool:
  return bool(workdir) and latest_step(workdir) is not None


class Checkpointer:
  """Saves/restores {"state": TrainState, "data": iterator state (JSON)}."""

  def __init__(self, workdir: str, *, max_to_keep: int):
    self._mngr = ocp.CheckpointManager(
        directory(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=("state", "data"))

  def save(self, step: int, state, data_state) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)))

  def restore_latest(self, abstract_state):
    """(state, data_state) of the latest step, or None if there is none."""
    step = self._mngr.latest_step()
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return out.state, out.data

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def load_params(workdir: str):
  """Params {"model": ...} of the latest checkpoint in `workdir` (read-only).

  Used to load a frozen teacher or a model to evaluate: nothing is written
  to `workdir`. Restored onto this process's first device whatever the
  topology that saved it (a pod run's checkpoint loads on a laptop).
  """
  step = latest_step(workdir)
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory(workdir)}: expected "
                            "the workdir of a finished train_teacher run.")
  with ocp.CheckpointManager(
      directory(workdir),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True,
                                           create=False)) as mngr:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step)["state"])
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  return jax.tree.map(jax.numpy.asarray, out.state["params"])
