r"""Table of finished runs: python -m evl_ecg_jax.eval.report NAME=WORKDIR ...

Reads each run's metrics.json and prints a markdown table (macro-AUC per
split, per-class test AUC) and, for distilled runs, their distillation
diagnostics (docs/evl.md); --out also writes them to a file.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Also write the table here.")


def load(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: the run in {workdir} has not "
                            "finished (metrics.json is written at the end).")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def table(runs: dict[str, dict]) -> str:
  """Markdown table: one row per run, macro-AUC per split, per-class test AUC."""
  first = next(iter(runs.values()))
  splits = sorted({k.split("/")[0] for k in first if k.endswith("/macro_auc")},
                  key=lambda s: (s != "validation", s))
  classes = [k.split("/")[-1] for k in first if k.startswith("test/auc/")]
  head = (["run", "model", "params"] + [f"{s} macro-AUC" for s in splits]
          + [f"test AUC {c}" for c in classes])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, m in runs.items():
    cells = ([name, m["model"], f"{m['num_params']:,}"]
             + [f"{m[f'{s}/macro_auc']:.4f}" for s in splits]
             + [f"{m[f'test/auc/{c}']:.3f}" for c in classes])
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


# (metrics.json key, column) of the diagnostics table: does distillation act
# (gradient share), does it depend on the teacher's record (gradient cosine
# with a shuffled teacher: 1 = not at all), does the student follow the
# teacher (CKA, matched vs shuffled records).
_DIAG = (("grad_share/{}", "grad share {}"),
         ("teacher_grad_cos/{}", "shuffled-teacher grad cos {}"))
_CKA = (("cka/pooled", "CKA pooled"), ("cka/pooled_shuffled", "(shuffled)"),
        ("cka/tokens", "CKA tokens"), ("cka/tokens_shuffled", "(shuffled)"))


def diagnostics_table(runs: dict[str, dict]) -> str:
  """Markdown table of the distilled runs' last diagnostics ("" if none)."""
  runs = {k: m for k, m in runs.items()
          if any(key.startswith("diag/") for key in m)}
  if not runs:
    return ""
  # Terms that reach the student (the aligner's guard never does).
  terms = sorted({k.split("/")[-1] for m in runs.values() for k, v in m.items()
                  if k.startswith("diag/grad_share/") and v > 0})
  cols = [(key.format(t), name.format(t)) for key, name in _DIAG
          for t in terms] + list(_CKA)
  rows = ["| run | " + " | ".join(name for _, name in cols) + " |",
          "|---|" + "---|" * len(cols)]
  for name, m in runs.items():
    rows.append(f"| {name} | " + " | ".join(
        f"{m[f'diag/{key}']:.3f}" if f"diag/{key}" in m else "–"
        for key, _ in cols) + " |")
  return "\n".join(rows)


def main(argv):
  runs = {}
  for arg in argv[1:]:
    name, _, workdir = arg.rpartition("=")
    runs[name or os.path.basename(os.path.normpath(workdir))] = load(workdir)
  if not runs:
    sys.exit("usage: python -m evl_ecg_jax.eval.report NAME=WORKDIR ...")
  text = table(runs)
  diag = diagnostics_table(runs)
  if diag:
    text += ("\n\nDistillation diagnostics (end of training; docs/evl.md):"
             "\n\n" + diag)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
