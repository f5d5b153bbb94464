"""Orbax checkpoints in `<workdir>/checkpoints`: state, data iterator, config.

Each step holds three items: "state" (TrainState: params, optimizer state,
step, RNG), "data" (the grain iterator state, JSON) and "config" (the run's
config, JSON). Saves are asynchronous; orbax writes each step into a
temporary directory and renames it when complete, so a crash never leaves
a checkpoint that restore would pick up.

Kept: the last `max_to_keep` steps, plus the step with the best validation
metric (`best_metric`, e.g. "validation/macro_auc") among those saved with
metrics.
"""

from __future__ import annotations

import os

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; names the step folder and why."""


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


def _flat(tree) -> dict:
  """{"a/b/c": leaf} of a nested tree (dicts, dataclasses, lists)."""
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(
      k, "idx", k)))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def config_diff(saved: dict, current: dict) -> list[str]:
  """'config.x.y: checkpoint A, now B' for every field that differs."""
  a, b = _flat(saved or {}), _flat(current or {})
  out = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append(f"config.{key.replace('/', '.')}: checkpoint "
                 f"{a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
  return out


def _shape_diff(metadata, target) -> list[str]:
  """'path: checkpoint (..), expected (..)' for arrays that do not match."""
  saved, wanted = _flat(metadata), _flat(target)
  out = [f"{k}: {'missing from the checkpoint' if k not in saved else ''}"
         f"{'not expected by this config' if k not in wanted else ''}"
         for k in sorted(set(saved) ^ set(wanted))]
  out += [f"{k}: checkpoint {tuple(saved[k].shape)}, expected "
          f"{tuple(wanted[k].shape)}" for k in sorted(set(saved) & set(wanted))
          if tuple(saved[k].shape) != tuple(wanted[k].shape)]
  return out


# Orbax's array handler splits the writing of a replicated array across its
# replicas ("replica-parallel"), slicing it on device first: one compiled
# slice program per (shape, replica) whatever the array's size. Below
# _MIN_REPLICA_SLICE_BYTES a slice is not worth a program (a pmap run on
# 8 devices compiled 256 of them, 7 s, per saved tiny model); a replica
# writes the whole array instead. Large arrays (a pod's params) are still
# written replica-parallel.
_MIN_REPLICA_SLICE_BYTES = 1 << 20
_STATE_TYPES = ocp.type_handlers.create_type_handler_registry(
    (int, ocp.type_handlers.ScalarHandler()),
    (float, ocp.type_handlers.ScalarHandler()),
    (np.number, ocp.type_handlers.ScalarHandler()),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)))


def _save_state(state):
  return ocp.args.PyTreeSave(state)


def _restore_state(target):
  """Restore args for a tree of ShapeDtypeStructs (with their shardings)."""
  return ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _manager(workdir, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory(workdir), options=options,
                               item_handlers={
                                   "state": ocp.PyTreeCheckpointHandler(
                                       type_handler_registry=_STATE_TYPES),
                                   "data": ocp.JsonCheckpointHandler(),
                                   "config": ocp.JsonCheckpointHandler()})


class Checkpointer:
  """Saves/restores one training run's checkpoints (see module docstring)."""

  def __init__(self, workdir: str, *, max_to_keep: int, config: dict,
               best_metric: str = "", best_mode: str = "max"):
    keep = [policies.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
      keep.append(policies.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self._config, self._dir = config, directory(workdir)
    self._mngr = _manager(workdir, ocp.CheckpointManagerOptions(
        create=True, best_fn=best_fn, best_mode=best_mode,
        preservation_policy=policies.AnyPreservationPolicy(keep)))

  def save(self, step: int, state, data_state, metrics=None) -> None:
    """Async save; `metrics` ({name: float}) rank it for best_step."""
    self._mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        state=_save_state(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self._config)))

  def best_step(self) -> int | None:
    return self._mngr.best_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore_latest(self, abstract_state):
    """(state, data_state) of the latest step, or None if there is none.

    Raises CheckpointError when the checkpoint was written by a config
    whose arrays differ in shape (naming the arrays and the config fields
    that differ), or when its files are unreadable (naming the step folder
    and the earlier steps to fall back to).
    """
    step = self._mngr.latest_step()
    if step is None:
      return None
    where = f"{self._dir}/{step}"
    try:
      meta = self._mngr.item_metadata(step)
      saved = self._mngr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore())).config
    except Exception as e:  # orbax/tensorstore raise many types.
      raise self._unreadable(where, step, e) from None
    mismatch = _shape_diff(meta["state"], abstract_state)
    if mismatch:
      raise CheckpointError(
          f"{where} was written by another config: its arrays do not match "
          f"this run's ({'; '.join(mismatch[:5])}"
          f"{'; ...' if len(mismatch) > 5 else ''}). Config fields that "
          f"differ: {config_diff(saved, self._config)[:10] or 'none'}. Use "
          "another --workdir, or the checkpoint's config.")
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=_restore_state(abstract_state),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types.
      raise self._unreadable(where, step, e) from None
    return out.state, out.data

  def _unreadable(self, where, step, error) -> CheckpointError:
    earlier = [s for s in self._mngr.all_steps() if s < step]
    advice = (f"delete {where} to resume from step {max(earlier)}"
              if earlier else "no earlier step to fall back to")
    return CheckpointError(f"{where}: unreadable checkpoint "
                           f"({type(error).__name__}: {str(error)[:300]}); "
                           f"{advice}.")

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def load_params(workdir: str, which: str = "latest"):
  """Params {"model": ...} of the latest (or best) checkpoint (read-only).

  Used to load a frozen teacher or a model to evaluate: nothing is written
  to `workdir`. Restored onto this process's first device whatever the
  topology that saved it (a pod run's checkpoint loads on a laptop).
  `which="best"` is the step with the best validation metric (the latest
  when the run tracked none).
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which={which!r}: expected 'latest' or 'best'.")
  if latest_step(workdir) is None:
    raise FileNotFoundError(f"No checkpoint in {directory(workdir)}: expected "
                            "the workdir of a finished train_teacher run.")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with _manager(workdir, options) as mngr:
    step = mngr.latest_step()
    if which == "best":
      metric, mode = _best_metric(mngr, step)
      scored = {s: m[metric] for s in mngr.all_steps()
                if metric and (m := mngr.metrics(s))}
      if scored:
        step = (max if mode == "max" else min)(scored, key=scored.get)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step)["state"])
    out = mngr.restore(step, args=ocp.args.Composite(
        state=_restore_state(target)))
  return jax.tree.map(jax.numpy.asarray, out.state["params"])


def _best_metric(mngr, step) -> tuple[str, str]:
  """(metric, mode) the run that wrote `step` ranked its checkpoints by."""
  config = mngr.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore())).config or {}
  ckpt = config.get("ckpt", {})
  return ckpt.get("best_metric", ""), ckpt.get("best_mode", "max")


def load_config(workdir: str, step: int | None = None) -> dict:
  """The config a run stored with its latest (or given) checkpoint."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with _manager(workdir, options) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory(workdir)}.")
    return mngr.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
