"""PhysioNet/CinC Challenge 2020-21 WFDB records (`.hea` + `.mat`).

No TFDS here (`builders/cinc2021.py` is a thin layer over it).
- Labels: the header's `Dx:` SNOMED CT codes mapped to the Challenge 2021
  scored classes, with its equivalence pairs scored as one class
  (`dx_mapping_scored.csv` of physionetchallenges/evaluation-2021, commit
  09de852). Unscored codes are ignored; a record may have no scored class.
- Source database from the record-name prefix (`source_database`).
- Signals: `val` of the MATLAB v4 file, converted to physical units with the
  header's gain and baseline, leads in the standard 12-lead order.
- Length policy (`crop_or_pad`): after resampling to a common rate, keep the
  first `length` samples; shorter records are zero-padded at the end and
  their true length is kept (`valid_length`). Random crops belong to
  training augmentation, not to the stored dataset.
"""

from __future__ import annotations

import os
import re

import numpy as np

LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5",
         "V6")
# (abbreviation, SNOMED CT codes scored as that class), in the order of the
# Challenge's dx_mapping_scored.csv.
SCORED_CLASSES = (
    ("AF", ("164889003",)), ("AFL", ("164890007",)), ("BBB", ("6374002",)),
    ("Brady", ("426627000",)), ("CLBBB|LBBB", ("733534002", "164909002")),
    ("CRBBB|RBBB", ("713427006", "59118001")), ("IAVB", ("270492004",)),
    ("IRBBB", ("713426002",)), ("LAD", ("39732003",)),
    ("LAnFB", ("445118002",)), ("LQRSV", ("251146004",)),
    ("NSIVCB", ("698252002",)), ("NSR", ("426783006",)),
    ("PAC|SVPB", ("284470004", "63593006")), ("PR", ("10370003",)),
    ("PRWP", ("365413008",)), ("PVC|VPB", ("427172004", "17338001")),
    ("LPR", ("164947007",)), ("LQT", ("111975006",)),
    ("QAb", ("164917005",)), ("RAD", ("47665007",)), ("SA", ("427393009",)),
    ("SB", ("426177001",)), ("STach", ("427084000",)),
    ("TAb", ("164934002",)), ("TInv", ("59931005",)),
)
CLASS_NAMES = tuple(name for name, _ in SCORED_CLASSES)
_CODE_TO_CLASS = {code: i for i, (_, codes) in enumerate(SCORED_CLASSES)
                  for code in codes}
# Record-name prefix -> source database. JS covers two databases: Chapman-
# Shaoxing is JS00001-JS10646, Ningbo JS10647 onwards.
SOURCES = ("cpsc2018", "cpsc_extra", "incart", "ptb", "ptb_xl", "g12ec",
           "chapman_shaoxing", "ningbo")
_PREFIXES = {"A": "cpsc2018", "Q": "cpsc_extra", "I": "incart", "S": "ptb",
             "HR": "ptb_xl", "E": "g12ec"}
_CHAPMAN_LAST = 10646


class BadRecord(ValueError):
  """A record that cannot be used; the message names the record and why."""


def source_database(record: str) -> str:
  """Source database of a Challenge record name (e.g. 'E00004' -> g12ec)."""
  match = re.fullmatch(r"([A-Z]+)(\d+)", record)
  if match is None:
    raise BadRecord(f"record {record}: name is not <prefix><number>.")
  prefix, number = match.groups()
  if prefix == "JS":
    return "chapman_shaoxing" if int(number) <= _CHAPMAN_LAST else "ningbo"
  if prefix not in _PREFIXES:
    raise BadRecord(f"record {record}: unknown prefix {prefix!r}; known: "
                    f"{sorted(_PREFIXES) + ['JS']}.")
  return _PREFIXES[prefix]


def find_records(root: str) -> list[str]:
  """Sorted record paths (no extension) of every .hea below `root`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: not found (expected a folder of "
                            "Challenge .hea/.mat records, at any depth).")
  out = [os.path.join(d, f[:-4]) for d, _, files in os.walk(root)
         for f in files if f.endswith(".hea")]
  return sorted(out, key=os.path.basename)


def header_fields(comments) -> dict[str, str]:
  """{'Age': '74', 'Dx': '59118001', ...} from the header comment lines."""
  out = {}
  for line in comments:
    key, sep, value = line.lstrip("# ").partition(":")
    if sep:
      out[key.strip()] = value.strip()
  return out


def scored_labels(dx: str) -> np.ndarray:
  """Multi-hot float32 [26] of the scored classes among comma-separated codes."""
  hot = np.zeros(len(SCORED_CLASSES), np.float32)
  for code in filter(None, (c.strip() for c in dx.split(","))):
    if code in _CODE_TO_CLASS:
      hot[_CODE_TO_CLASS[code]] = 1.0
  return hot


def read_record(path: str):
  """(signal [T, 12] float32 in physical units, fs, header fields).

  Raises BadRecord naming the record for a missing/unreadable file, a lead
  set other than the 12 standard leads, a shape that disagrees with the
  header, a non-numeric dtype, or non-finite samples.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top
  import wfdb  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path)
  for ext in (".hea", ".mat"):
    if not os.path.exists(path + ext):
      raise BadRecord(f"record {name}: {path + ext} not found.")
  try:
    header = wfdb.rdheader(path)
    val = scipy.io.loadmat(path + ".mat")["val"]
  except Exception as e:  # wfdb and scipy raise many types on bad files.
    raise BadRecord(f"record {name}: unreadable: {e}") from None
  if not (np.issubdtype(val.dtype, np.integer)
          or np.issubdtype(val.dtype, np.floating)):
    raise BadRecord(f"record {name}: .mat 'val' has dtype {val.dtype}, "
                    "expected integer or float samples.")
  leads = tuple(n.upper() for n in header.sig_name)
  if leads != LEADS:
    raise BadRecord(f"record {name}: leads {leads}, expected {LEADS}.")
  if val.shape != (header.n_sig, header.sig_len):
    raise BadRecord(f"record {name}: .mat holds {val.shape}, the header "
                    f"says {(header.n_sig, header.sig_len)}.")
  gain = np.asarray(header.adc_gain, np.float64)[:, None]
  baseline = np.asarray(header.baseline, np.float64)[:, None]
  signal = ((val - baseline) / gain).T.astype(np.float32)
  # A zero gain never reaches here: WFDB reads it as the default 200 adu/mV
  # (tests/reliability: cinc_zero_gain).
  if not np.all(np.isfinite(signal)):
    raise BadRecord(f"record {name}: non-finite samples.")
  return signal, header.fs, header_fields(header.comments or ())


def crop_or_pad(signal: np.ndarray, length: int):
  """(first `length` samples, zero-padded at the end; true length kept)."""
  valid = min(len(signal), length)
  out = np.zeros((length,) + signal.shape[1:], np.float32)
  out[:valid] = signal[:valid]
  return out, valid
