"""Shared by the benchmarks: interleaved timing and JSON + markdown output."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np


def time_interleaved(cases: Mapping[str, Callable[[], object]], *, calls: int,
                     repeats: int) -> dict[str, float]:
  """Median seconds per call of each case, after one warm-up (compile) call.

  Rounds are interleaved (case A, B, C, A, B, C, ...) so that drift on a
  noisy machine hits every case alike; ratios between cases are the result.
  """
  for fn in cases.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, fn in cases.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return {name: float(np.median(t)) for name, t in times.items()}


def write_report(out_dir: str, name: str, result: dict,
                 header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Writes <name>.json (`result`) and <name>.md (a table); returns the table."""
  os.makedirs(out_dir, exist_ok=True)
  result = dict(result, backend=jax.default_backend(),
                devices=jax.local_device_count())
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(text + "\n")
  return text
