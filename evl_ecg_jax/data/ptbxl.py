"""PTB-XL in its official layout: metadata, label sets and WFDB records.

No TFDS here (the builder in `builders/ptbxl.py` is a thin layer over it), so
the parsing can be tested and reused alone. Label sets follow the PTB-XL
benchmark (Strodthoff et al. 2021, `compute_label_aggregations`): every key of
`scp_codes` found in `scp_statements.csv` counts, whatever its likelihood;
  diagnostic      keys with diagnostic == 1
  subdiagnostic   their diagnostic_subclass
  superdiagnostic their diagnostic_class
  form / rhythm   keys with form == 1 / rhythm == 1
  all             every key in scp_statements.csv
Records without a label of the set are dropped (and counted) by the caller.
Class vocabularies come from scp_statements.csv, not from the records, so a
subset and the full dataset give label vectors of the same layout.
"""

from __future__ import annotations

import ast
import csv
import os
from typing import Iterable, Mapping

import numpy as np

LABEL_SETS = ("superdiagnostic", "subdiagnostic", "diagnostic", "form",
              "rhythm", "all")
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")  # the usual order
LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5",
         "V6")
DURATION_S = 10
DATABASE = "ptbxl_database.csv"
STATEMENTS = "scp_statements.csv"
DATABASE_COLUMNS = ("ecg_id", "patient_id", "age", "sex", "report",
                    "scp_codes", "strat_fold", "filename_lr", "filename_hr")
STATEMENT_COLUMNS = ("description", "diagnostic", "form", "rhythm",
                     "diagnostic_class", "diagnostic_subclass")


class BadRecord(ValueError):
  """A record that cannot be used; the message names the record and why."""


def _read_csv(path: str, required: Iterable[str]) -> list[dict]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (expected the PTB-XL "
                            "folder layout: ptbxl_database.csv, "
                            "scp_statements.csv, records100/, records500/).")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}; found "
                       f"{reader.fieldnames}.")
    return list(reader)


def read_statements(root: str) -> dict[str, dict]:
  """scp_statements.csv as {code: row} (the index column holds the code)."""
  path = os.path.join(root, STATEMENTS)
  rows = _read_csv(path, STATEMENT_COLUMNS)
  return {row[""] if "" in row else next(iter(row.values())): row
          for row in rows}


def _flag(row, column) -> bool:
  value = row[column].strip()
  return bool(value) and float(value) == 1.0


def statement_classes(statements: Mapping[str, dict],
                      label_set: str) -> dict[str, str]:
  """{scp code: class name} of the codes that count for `label_set`."""
  if label_set not in LABEL_SETS:
    raise ValueError(f"label_set={label_set!r}: expected one of {LABEL_SETS}.")
  out = {}
  for code, row in statements.items():
    if label_set == "all":
      out[code] = code
    elif label_set in ("form", "rhythm"):
      if _flag(row, label_set):
        out[code] = code
    elif _flag(row, "diagnostic"):
      column = {"diagnostic": None, "subdiagnostic": "diagnostic_subclass",
                "superdiagnostic": "diagnostic_class"}[label_set]
      name = code if column is None else row[column].strip()
      if name:
        out[code] = name
  return out


def class_names(statements: Mapping[str, dict], label_set: str) -> tuple:
  """The label vector's class order: SUPERCLASSES, else sorted names."""
  names = set(statement_classes(statements, label_set).values())
  if label_set == "superdiagnostic" and names <= set(SUPERCLASSES):
    return SUPERCLASSES
  return tuple(sorted(names))


def parse_scp_codes(text: str, ecg_id) -> dict[str, float]:
  """The `scp_codes` dict string, parsed with ast.literal_eval (never eval)."""
  try:
    codes = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise BadRecord(f"ecg_id {ecg_id}: scp_codes {text!r} is not a dict "
                    f"literal ({e.__class__.__name__}).") from None
  if not isinstance(codes, dict) or not all(
      isinstance(k, str) and isinstance(v, (int, float))
      for k, v in codes.items()):
    raise BadRecord(f"ecg_id {ecg_id}: scp_codes {text!r}: expected a dict "
                    "of statement code -> likelihood.")
  return codes


def labels(codes: Mapping[str, float], classes: Mapping[str, str],
           names: tuple) -> np.ndarray:
  """Multi-hot float32 vector over `names` of the codes in `codes`."""
  hot = {classes[c] for c in codes if c in classes}
  return np.asarray([n in hot for n in names], np.float32)


def read_database(root: str) -> list[dict]:
  """Rows of ptbxl_database.csv, checked for duplicated ecg_ids."""
  path = os.path.join(root, DATABASE)
  rows = _read_csv(path, DATABASE_COLUMNS)
  seen = set()
  for row in rows:
    if row["ecg_id"] in seen:
      raise ValueError(f"{path}: ecg_id {row['ecg_id']} appears twice.")
    seen.add(row["ecg_id"])
  return rows


def record_path(root: str, row: Mapping[str, str], sampling_rate: int) -> str:
  """WFDB record path (no extension) of a row at 100 or 500 Hz."""
  column = {100: "filename_lr", 500: "filename_hr"}.get(sampling_rate)
  if column is None:
    raise ValueError(f"sampling_rate={sampling_rate}: PTB-XL has 100 and "
                     "500 Hz records.")
  return os.path.join(root, row[column])


def read_signal(path: str, sampling_rate: int, ecg_id) -> np.ndarray:
  """[T, 12] float32 signal of a WFDB record, in PTB-XL lead order.

  Raises BadRecord naming the record for a missing or unreadable file, a
  sampling rate, lead set or length other than expected, or non-finite
  samples.
  """
  import wfdb  # pylint: disable=g-import-not-at-top  (slow import)
  for ext in (".hea", ".dat"):
    if not os.path.exists(path + ext):
      raise BadRecord(f"ecg_id {ecg_id}: {path + ext} not found.")
  try:
    signal, fields = wfdb.rdsamp(path)
  except Exception as e:  # wfdb raises many types on corrupt files.
    raise BadRecord(f"ecg_id {ecg_id}: {path} unreadable: {e}") from None
  if fields["fs"] != sampling_rate:
    raise BadRecord(f"ecg_id {ecg_id}: {path} has sampling rate "
                    f"{fields['fs']} Hz, expected {sampling_rate}.")
  names = tuple(n.upper() for n in fields["sig_name"])
  if names != LEADS:
    raise BadRecord(f"ecg_id {ecg_id}: {path} has leads {names}, expected "
                    f"{LEADS}.")
  if signal.shape[0] != DURATION_S * sampling_rate:
    raise BadRecord(f"ecg_id {ecg_id}: {path} has {signal.shape[0]} samples, "
                    f"expected {DURATION_S * sampling_rate}.")
  if not np.all(np.isfinite(signal)):
    raise BadRecord(f"ecg_id {ecg_id}: {path} has NaN/Inf samples.")
  return signal.astype(np.float32)


def as_int(value: str, default: int = -1) -> int:
  """'56.0' -> 56; '' (missing) -> default."""
  return int(float(value)) if value.strip() else default


def as_float(value: str) -> float:
  """'56.0' -> 56.0; '' (missing) -> NaN."""
  return float(value) if value.strip() else float("nan")
