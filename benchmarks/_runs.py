"""Finished runs the benchmarks reuse (kd_table's resumable table)."""

from __future__ import annotations

import json
import os

from evl_ecg_jax.losses import terms


def _flat(tree, prefix=""):
  """{dotted field: value} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def reusable(config, workdir) -> bool:
  """Whether `workdir` holds a finished run of `config`'s objective. A run
  of another loss (a default changed since, e.g. a term's field) under the
  same name is an error, not a silent reuse. A term field the stored config
  lacks (a run older than the field) ran the part's default."""
  if not os.path.exists(os.path.join(workdir, "metrics.json")):
    return False
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    stored = _flat(json.load(f)["loss"])
  wanted = _flat(json.loads(json.dumps(config.loss.to_dict())))
  defaults = _flat(json.loads(json.dumps({"terms": terms.defaults()})))
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
