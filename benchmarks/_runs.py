"""Finished runs the benchmarks reuse (kd_table's resumable table)."""

from __future__ import annotations

import inspect
import json
import os

from evl_ecg_jax import losses


def reusable(config, workdir) -> bool:
  """Whether `workdir` holds a finished run of `config`'s objective. A run
  of another loss (a default changed since, e.g. loss.relation_batch_form)
  under the same name is an error, not a silent reuse. A field the stored
  config lacks (a run older than the field) ran the objective's default."""
  if not os.path.exists(os.path.join(workdir, "metrics.json")):
    return False
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    stored = json.load(f)["loss"]
  wanted = json.loads(json.dumps(config.loss.to_dict()))
  defaults = {k: p.default for k, p in inspect.signature(
      losses.make_objective).parameters.items()}
  stored = {k: stored.get(k, defaults.get(k)) for k in set(stored) | set(
      wanted)}
  changed = sorted(k for k in stored if stored[k] != wanted.get(k))
  if changed:
    raise ValueError(
        f"{workdir}: a finished run with another loss config (fields "
        f"{', '.join(f'loss.{k}' for k in changed)}: stored "
        f"{[stored.get(k) for k in changed]}, wanted "
        f"{[wanted.get(k) for k in changed]}); remove it or use another "
        "--out.")
  return True
