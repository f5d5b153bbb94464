"""The ptbxl builder on the shared PTB-XL subset, label sets and bad records.

Needs ../shared/data/ptbxl (the real PTB-XL subset beside the repo, present in
CI); without it these tests skip and say so.
"""

import ast
import collections
import csv
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO
from conftest import copy_ptbxl
from conftest import write_ptbxl_db
from evl_ecg_jax.data import ptbxl
from evl_ecg_jax.data.builders import ptbxl as ptbxl_builder

ROOT = os.path.join(os.path.dirname(REPO), "shared", "data", "ptbxl")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, "ptbxl_database.csv")),
    reason=f"{ROOT} not found: these tests read the real PTB-XL subset that "
    "lies beside the repo (../shared/data/ptbxl, present in CI).")


def _build(manual_dir, data_dir, name="100hz_superdiagnostic", **config):
  cfg = (ptbxl_builder.PtbxlConfig(name="custom", **config) if config
         else name)
  builder = tfds.builder("ptbxl", config=cfg, data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return _build(ROOT, tmp_path_factory.mktemp("tfds_ptbxl"))


def _expected_counts():
  """Records and superclass counts per fold, read with plain csv + ast."""
  with open(os.path.join(ROOT, "scp_statements.csv"), newline="") as f:
    superclass = {row[""]: row["diagnostic_class"] for row in csv.DictReader(f)
                  if row["diagnostic"] == "1.0"}
  records, classes = collections.Counter(), collections.Counter()
  with open(os.path.join(ROOT, "ptbxl_database.csv"), newline="") as f:
    for row in csv.DictReader(f):
      fold = int(row["strat_fold"])
      hot = {superclass[c] for c in ast.literal_eval(row["scp_codes"])
             if c in superclass}
      if hot:
        records[fold] += 1
        classes.update((fold, c) for c in hot)
  return records, classes


def test_counts_per_fold_and_superclass_match_the_csv(built):
  records, classes = _expected_counts()
  splits = built.info.splits
  assert sorted(splits) == [f"fold{k}" for k in sorted(records)]
  names = built.info.metadata["classes"]
  assert names == ["NORM", "MI", "STTC", "CD", "HYP"]
  for fold, n in records.items():
    source = tfds.data_source("ptbxl/100hz_superdiagnostic",
                              split=f"fold{fold}",
                              data_dir=built.data_dir.split("/ptbxl/")[0],
                              builder_kwargs={"file_format": "array_record"})
    assert splits[f"fold{fold}"].num_examples == n == len(source)
    labels = np.stack([source[i]["labels"] for i in range(len(source))])
    for j, name in enumerate(names):
      assert labels[:, j].sum() == classes[(fold, name)], (fold, name)
  # The shared subset's documented totals (data README).
  assert sum(records.values()) == 1625 and records[9] == 183
  assert built.info.metadata["build_counts"]["fold1"]["examples"] == 169


def test_records_equal_wfdb_and_fields(built):
  import wfdb  # pylint: disable=g-import-not-at-top
  source = tfds.data_source("ptbxl/100hz_superdiagnostic", split="fold3",
                            data_dir=built.data_dir.split("/ptbxl/")[0],
                            builder_kwargs={"file_format": "array_record"})
  rows = {int(r["ecg_id"]): r for r in ptbxl.read_database(ROOT)}
  for i in (0, len(source) - 1):
    ex = source[i]
    row = rows[int(ex["id"])]
    signal, _ = wfdb.rdsamp(os.path.join(ROOT, row["filename_lr"]))
    np.testing.assert_allclose(ex["ecg"], signal, atol=1e-6)
    assert ex["ecg"].shape == (1000, 12) and ex["ecg"].dtype == np.float32
    assert ex["patient_id"] == int(float(row["patient_id"]))
    assert ex["sex"] == int(row["sex"])
    assert ex["report"].decode() == row["report"]


def test_label_sets_from_a_hand_made_statement_table():
  statements = {
      "NORM": dict(diagnostic="1.0", form="", rhythm="",
                   diagnostic_class="NORM", diagnostic_subclass="NORM"),
      "IMI": dict(diagnostic="1.0", form="", rhythm="",
                  diagnostic_class="MI", diagnostic_subclass="IMI"),
      "NDT": dict(diagnostic="1.0", form="1.0", rhythm="",
                  diagnostic_class="STTC", diagnostic_subclass="STTC"),
      "SR": dict(diagnostic="", form="", rhythm="1.0",
                 diagnostic_class="", diagnostic_subclass=""),
  }
  codes = {"IMI": 50.0, "NDT": 0.0, "SR": 0.0}  # likelihood 0 still counts
  expected = {
      "superdiagnostic": (("NORM", "MI", "STTC", "CD", "HYP"), [0, 1, 1, 0, 0]),
      "subdiagnostic": (("IMI", "NORM", "STTC"), [1, 0, 1]),
      "diagnostic": (("IMI", "NDT", "NORM"), [1, 1, 0]),
      "form": (("NDT",), [1]),
      "rhythm": (("SR",), [1]),
      "all": (("IMI", "NDT", "NORM", "SR"), [1, 1, 0, 1]),
  }
  for label_set, (names, hot) in expected.items():
    classes = ptbxl.statement_classes(statements, label_set)
    assert ptbxl.class_names(statements, label_set) == names, label_set
    np.testing.assert_array_equal(ptbxl.labels(codes, classes, names), hot)
  with pytest.raises(ValueError, match="label_set"):
    ptbxl.statement_classes(statements, "superclass")


@pytest.mark.parametrize("text", ["{'NORM': 100.0", "__import__('os')",
                                  "['NORM']", "{'NORM': 'x'}"])
def test_scp_codes_are_literals_only(text):
  with pytest.raises(ptbxl.BadRecord, match="ecg_id 7"):
    ptbxl.parse_scp_codes(text, 7)


def _corrupt(root, rows, fields):
  """One fault per record 0..4; record 5 stays good. Returns their ids."""
  path = lambda i, ext: root / (rows[i]["filename_lr"] + ext)
  data = path(0, ".dat").read_bytes()
  path(0, ".dat").write_bytes(data[:len(data) // 3])  # truncated .dat
  path(1, ".hea").unlink()  # missing header
  hea = path(2, ".hea").read_text().splitlines()  # 11 leads
  hea[0] = hea[0].replace(" 12 ", " 11 ")
  path(2, ".hea").write_text("\n".join(hea[:-1]) + "\n")
  hea = path(3, ".hea").read_text()  # 257 Hz
  path(3, ".hea").write_text(hea.replace(" 100 ", " 257 ", 1))
  rows[4]["scp_codes"] = "{'NORM': 100.0"  # unparsable
  write_ptbxl_db(root, rows, fields)
  return [r["ecg_id"] for r in rows]


def test_bad_records_fail_with_their_name_or_are_skipped_and_counted(
    tmp_path):
  root, rows, fields = copy_ptbxl(tmp_path, 6)
  ids = _corrupt(root, rows, fields)
  with pytest.raises(ptbxl.BadRecord, match=r"ecg_id \d+: .*skip_bad_records"):
    _build(root, tmp_path / "fail", sampling_rate=100,
           label_set="superdiagnostic")
  builder = _build(root, tmp_path / "skip", sampling_rate=100,
                   label_set="superdiagnostic", skip_bad_records=True)
  counts = builder.info.metadata["build_counts"]
  assert sum(c.get("skipped", 0) for c in counts.values()) == 5
  assert sum(c.get("examples", 0) for c in counts.values()) == 1
  assert sum(s.num_examples for s in builder.info.splits.values()) == 1
  # Folds whose records were all skipped get no split, and are listed.
  assert set(builder.info.splits) | set(
      builder.info.metadata["empty_folds"]) == set(counts)
  assert builder.info.metadata["empty_folds"]
  # Each fault names its record and what is wrong.
  for i, match in ((0, "unreadable"), (1, r"\.hea not found"),
                   (2, "leads"), (3, "257")):
    with pytest.raises(ptbxl.BadRecord, match=f"ecg_id {ids[i]}: .*{match}"):
      ptbxl.read_signal(str(root / rows[i]["filename_lr"]), 100, ids[i])


def test_config_runs_on_the_shared_subset_and_names_missing_folds(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = default.get_config("mode=train_teacher,data=ptbxl,folds=shared,"
                              "runlocal")
  config.data.manual_dir = ROOT
  config.data.data_dir = str(tmp_path / "tfds")
  metrics = loop.fit(config, str(tmp_path / "teacher"))
  assert metrics["test/n"] == 183 and metrics["validation/n"] == 160
  assert 0.0 <= metrics["test/macro_auc"] <= 1.0
  # The benchmark's folds ask for fold 10, which the subset lacks: the run
  # stops before training, naming the field and the remedy.
  config = default.get_config("mode=train_teacher,data=ptbxl,runlocal")
  config.data.manual_dir = ROOT
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match="config.data.splits.test='fold10'.*"
                     "folds=shared"):
    loop.fit(config, str(tmp_path / "standard"))
  assert not (tmp_path / "standard").exists()
