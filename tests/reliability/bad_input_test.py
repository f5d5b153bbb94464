"""The bad-input corpus: real files from ../shared/data, copied and corrupted.

Every case ends in its documented behaviour (docs/reliability.md lists each
id below): a clear error naming the record, file, checkpoint or config
field, or a skip that is counted. Needs ../shared/data (present in CI);
without it the data cases skip and say so.
"""

import os
import shutil

import numpy as np
import pytest
import scipy.io

from conftest import DATA
from conftest import REPO
from conftest import copy_ptbxl
from conftest import set_fields
from conftest import write_ptbxl_db
from configs import default
from evl_ecg_jax import checkpoint
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import models
from evl_ecg_jax.data import cinc
from evl_ecg_jax.data import ptbxl
from evl_ecg_jax.data import transforms
from evl_ecg_jax.train import build

PTBXL, CINC = os.path.join(DATA, "ptbxl"), os.path.join(DATA, "cinc")
needs_ptbxl = pytest.mark.skipif(
    not os.path.exists(os.path.join(PTBXL, "ptbxl_database.csv")),
    reason=f"{PTBXL} not found: the corpus corrupts copies of the real "
    "PTB-XL subset beside the repo (../shared/data, present in CI).")
needs_cinc = pytest.mark.skipif(
    not os.path.isdir(CINC),
    reason=f"{CINC} not found: the corpus corrupts copies of the real "
    "Challenge records beside the repo (../shared/data, present in CI).")


# --- PTB-XL --------------------------------------------------------------

def _edit_header(path, fn):
  lines = path.read_text().splitlines()
  path.write_text("\n".join(fn(lines)) + "\n")


def _set_sample(path, value, at=200):
  data = bytearray(path.read_bytes())
  data[at:at + 2] = int(value).to_bytes(2, "little", signed=True)
  path.write_bytes(bytes(data))


# id -> (corruption of the record's files (.hea path, .dat path), error regex)
PTBXL_RECORDS = {
    "ptbxl_truncated_dat": (
        lambda hea, dat: dat.write_bytes(dat.read_bytes()[:5000]),
        "unreadable|samples"),
    "ptbxl_zero_length_dat": (lambda hea, dat: dat.write_bytes(b""),
                              "unreadable|samples"),
    "ptbxl_missing_hea": (lambda hea, dat: hea.unlink(), r"\.hea not found"),
    "ptbxl_missing_dat": (lambda hea, dat: dat.unlink(), r"\.dat not found"),
    "ptbxl_11_leads": (lambda hea, dat: _edit_header(hea, lambda l: [
        l[0].replace(" 12 ", " 11 ", 1)] + l[1:12]), "leads"),
    "ptbxl_257_hz": (lambda hea, dat: _edit_header(hea, lambda l: [
        l[0].replace(" 100 ", " 257 ", 1)] + l[1:]), "257 Hz, expected 100"),
    "ptbxl_swapped_lead_names": (lambda hea, dat: _edit_header(
        hea, lambda l: [l[0], l[2], l[1]] + l[3:]), "leads"),
    "ptbxl_wrong_dtype": (lambda hea, dat: _edit_header(hea, lambda l: [
        l[0]] + [x.replace(" 16 ", " 32 ", 1) for x in l[1:]]),
                          "unreadable|samples"),
    "ptbxl_nan_sample": (lambda hea, dat: _set_sample(dat, -32768), "NaN"),
    "ptbxl_garbage_header": (lambda hea, dat: hea.write_text("garbage\n"),
                             "unreadable"),
}


@needs_ptbxl
@pytest.mark.parametrize("case", sorted(PTBXL_RECORDS))
def test_ptbxl_bad_record_is_named(case, tmp_path):
  root, rows, _ = copy_ptbxl(tmp_path, 1)
  path = root / rows[0]["filename_lr"]
  corrupt, match = PTBXL_RECORDS[case]
  corrupt(path.with_suffix(".hea"), path.with_suffix(".dat"))
  with pytest.raises(ptbxl.BadRecord,
                     match=f"ecg_id {rows[0]['ecg_id']}: .*({match})"):
    ptbxl.read_signal(str(path), 100, rows[0]["ecg_id"])


@needs_ptbxl
def test_ptbxl_constant_zero_lead_is_kept_and_stays_finite(tmp_path):
  """A flat lead (lead off) is real data: kept; z-scoring gives 0, not NaN."""
  root, rows, _ = copy_ptbxl(tmp_path, 1)
  path = root / rows[0]["filename_lr"]
  signal = ptbxl.read_signal(str(path), 100, rows[0]["ecg_id"])
  signal[:, 3] = 0.0
  z = transforms.standardize(signal)
  assert np.all(np.isfinite(z)) and np.all(z[:, 3] == 0)


@pytest.mark.parametrize("case,text,match", [
    ("ptbxl_unparsable_scp_codes", "{'NORM': 100.0", "not a dict literal"),
    ("ptbxl_scp_codes_code", "__import__('os').getcwd()",
     "not a dict literal"),
    ("ptbxl_scp_codes_not_a_dict", "[1, 2]", "expected a dict"),
    ("ptbxl_scp_codes_bad_likelihood", "{'NORM': 'high'}", "expected a dict"),
])
def test_ptbxl_bad_scp_codes_are_named(case, text, match):
  del case
  with pytest.raises(ptbxl.BadRecord, match=f"ecg_id 7: .*{match}"):
    ptbxl.parse_scp_codes(text, 7)


@needs_ptbxl
def test_ptbxl_database_errors_name_the_file(tmp_path):
  root, rows, fields = copy_ptbxl(tmp_path, 2)
  write_ptbxl_db(root, rows + rows[:1], fields)  # ptbxl_duplicated_ecg_id
  with pytest.raises(ValueError, match=f"ptbxl_database.csv: ecg_id "
                     f"{rows[0]['ecg_id']} appears twice"):
    ptbxl.read_database(str(root))
  write_ptbxl_db(root, [{k: v for k, v in r.items() if k != "scp_codes"}  # column
                   for r in rows], [f for f in fields if f != "scp_codes"])
  with pytest.raises(ValueError, match=r"ptbxl_database.csv: missing "
                     r"column\(s\) \['scp_codes'\]"):
    ptbxl.read_database(str(root))
  (root / "ptbxl_database.csv").unlink()  # ptbxl_missing_database_csv
  with pytest.raises(FileNotFoundError, match="ptbxl_database.csv: not found"):
    ptbxl.read_database(str(root))
  (root / "scp_statements.csv").unlink()  # ptbxl_missing_statements_csv
  with pytest.raises(FileNotFoundError, match="scp_statements.csv: not found"):
    ptbxl.read_statements(str(root))


@needs_ptbxl
def test_ptbxl_build_skips_and_counts_or_names_the_empty_split(tmp_path):
  """skip_bad_records: bad records skipped and counted, an unknown SCP code
  leaves no label (dropped and counted); a split left empty is an error
  naming config.data.splits."""
  from evl_ecg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  root, rows, fields = copy_ptbxl(tmp_path, 4)
  for row in rows:
    row["strat_fold"] = "1"
  rows[0]["scp_codes"] = "{'NOT_A_CODE': 100.0}"  # ptbxl_unknown_scp_code
  rows[1]["scp_codes"] = "{'NORM': 100.0"
  write_ptbxl_db(root, rows, fields)
  dat = root / (rows[2]["filename_lr"] + ".dat")
  dat.write_bytes(dat.read_bytes()[:100])
  config = default.get_config("mode=train_teacher,data=ptbxl,runlocal")
  config.data.manual_dir = str(root)
  config.data.data_dir = str(tmp_path / "default")
  config.data.tfds_name = "ptbxl/100hz_superdiagnostic"
  config.data.splits = {"train": "fold1", "validation": "fold2"}
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.data.builders import ptbxl as ptbxl_builder  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(
      "ptbxl", data_dir=str(tmp_path / "skip"), file_format="array_record",
      config=ptbxl_builder.PtbxlConfig(
          name="custom", sampling_rate=100, label_set="superdiagnostic",
          skip_bad_records=True))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root)))
  assert builder.info.metadata["build_counts"] == {"fold1": {
      "dropped_no_label": 1, "skipped": 2, "examples": 1}}
  write_ptbxl_db(root, rows[3:], fields)  # only the good record, in fold 1
  with pytest.raises(ValueError, match="config.data.splits.validation="
                     "'fold2'"):  # ptbxl_empty_split
    pipeline.source(config.data, "validation")


# --- CinC 2020/21 ----------------------------------------------------------

def _set_mat(mat, val):
  scipy.io.savemat(mat, {"val": val}, format="4")


CINC_RECORDS = {
    "cinc_zero_length_mat": (lambda hea, mat: mat.write_bytes(b""),
                             "unreadable"),
    "cinc_truncated_mat": (
        lambda hea, mat: mat.write_bytes(mat.read_bytes()[:500]),
        "unreadable|holds"),
    "cinc_missing_mat": (lambda hea, mat: mat.unlink(), r"\.mat not found"),
    "cinc_empty_header": (lambda hea, mat: hea.write_text(""), "unreadable"),
    "cinc_11_leads": (lambda hea, mat: _edit_header(hea, lambda l: [
        l[0].replace(" 12 ", " 11 ", 1)] + l[1:12] + l[13:]), "leads"),
    "cinc_header_length_mismatch": (lambda hea, mat: _edit_header(
        hea, lambda l: [" ".join(l[0].split()[:3] + ["4000"] +
                                 l[0].split()[4:])] + l[1:]), "holds"),
    "cinc_nan_samples": (lambda hea, mat: _set_mat(mat, np.where(
        np.arange(7500) == 9, np.nan, 1.0)[None].repeat(12, 0)),
                         "non-finite"),
    "cinc_wrong_dtype": (lambda hea, mat: scipy.io.savemat(
        mat, {"val": np.full((12, 7500), "a")}), "dtype|unreadable"),
}


@needs_cinc
@pytest.mark.parametrize("case", sorted(CINC_RECORDS))
def test_cinc_bad_record_is_named(case, tmp_path):
  for ext in (".hea", ".mat"):
    shutil.copy(os.path.join(CINC, "A0001" + ext), tmp_path)
  corrupt, match = CINC_RECORDS[case]
  corrupt(tmp_path / "A0001.hea", tmp_path / "A0001.mat")
  with pytest.raises(cinc.BadRecord, match=f"record A0001: .*({match})"):
    cinc.read_record(str(tmp_path / "A0001"))


@needs_cinc
def test_cinc_unknown_snomed_and_odd_rate_are_kept(tmp_path):
  """An unscored/unknown SNOMED code is ignored (no class); 257 Hz is read
  as such and resampled to the dataset rate, finite; a zero ADC gain is
  WFDB's default of 200 adu/mV."""
  for ext in (".hea", ".mat"):
    shutil.copy(os.path.join(CINC, "A0001" + ext), tmp_path)
  _edit_header(tmp_path / "A0001.hea", lambda l: [
      l[0].replace(" 500 ", " 257 ", 1),
      l[1].replace("1000/mV", "0/mV")] + [  # cinc_zero_gain
          "#Dx: 999999999" if x.startswith("#Dx") else x for x in l[2:]])
  signal, fs, fields = cinc.read_record(str(tmp_path / "A0001"))
  val = scipy.io.loadmat(tmp_path / "A0001.mat")["val"]
  # WFDB: a zero gain means the default 200 adu/mV.
  np.testing.assert_allclose(signal[:, 0], (val[0] - 0) / 200.0, rtol=1e-6)
  assert fs == 257 and fields["Dx"] == "999999999"
  assert not cinc.scored_labels(fields["Dx"]).any()
  out = transforms.resample(signal, fs, 500)
  assert out.shape[1] == 12 and np.all(np.isfinite(out))
  assert abs(out.shape[0] - round(len(signal) * 500 / 257)) <= 1
  with pytest.raises(cinc.BadRecord, match="record X12: unknown prefix"):
    cinc.source_database("X12")  # cinc_bad_record_name


# --- Checkpoints -----------------------------------------------------------

def _state(width):
  return {"params": {"dense": {"kernel": np.full((3, width), 1.0, np.float32)}},
          "step": np.int32(0)}


def _target(state):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      state)


def _save(workdir, width, steps=(1, 2)):
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3,
                                 config={"model": {"width": width}})
  for step in steps:
    ckpt.save(step, _state(width), {"position": step})
  ckpt.close()


def test_checkpoint_from_another_config_names_arrays_and_fields(tmp_path):
  _save(str(tmp_path), width=4)
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3,
                                 config={"model": {"width": 8}})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/2 was written by another config.*"
                     r"params/dense/kernel: checkpoint \(3, 4\), expected "
                     r"\(3, 8\).*config.model.width: checkpoint 4, now 8"):
    ckpt.restore_latest(_target(_state(8)))
  ckpt.close()


def test_corrupt_checkpoint_file_names_the_step_and_the_fallback(tmp_path):
  _save(str(tmp_path), width=4)
  step_dir = tmp_path / "checkpoints" / "2" / "state"
  files = [p for p in step_dir.rglob("*") if p.is_file()
           and p.stat().st_size > 0 and "metadata" not in p.name]
  for p in files:
    p.write_bytes(b"\0garbage" * 4)
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3,
                                 config={"model": {"width": 4}})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/2: unreadable checkpoint.*delete "
                     r".*checkpoints/2 to resume from step 1"):
    ckpt.restore_latest(_target(_state(4)))
  ckpt.close()


def test_partial_checkpoint_is_never_restored(tmp_path):
  """A save killed mid-write leaves orbax's temporary folder: ignored."""
  _save(str(tmp_path), width=4)
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  assert checkpoint.latest_step(str(tmp_path)) == 2
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3,
                                 config={"model": {"width": 4}})
  state, data = ckpt.restore_latest(_target(_state(4)))
  ckpt.close()
  assert data == {"position": 2} and state["params"]["dense"][
      "kernel"].shape == (3, 4)


# --- Config, before anything compiles --------------------------------------

def _distill(**overrides):
  config = default.get_config("mode=distill,loss=evl")
  config.teacher.init = "/t"
  return set_fields(config, overrides)


CONFIG_CASES = {
    "config_negative_loss_weight": ({"loss.terms.ot.weight": -0.1},
                                    r"config.loss.terms.ot.weight=-0.1"),
    "config_alpha_out_of_range": ({"loss.alpha": 2.0},
                                  r"config.loss.alpha=2.0"),
    "config_batch_vs_devices": ({"data.batch_size": 12},
                                r"config.data.batch_size=12"),
    "config_batch_vs_accumulation": ({"grad_accum_steps": 3},
                                     r"config.data.batch_size=32.*"
                                     r"grad_accum_steps=3"),
    "config_mesh_vs_devices": ({"sharding.mesh_shape": (3, 1, 1)},
                               r"config.sharding.mesh_shape=\(3, 1, 1\)"),
    "config_rule_unknown_mesh_axis": (
        {"sharding.rules": (("batch", "model"),)},
        r"config.sharding.rules=\('batch', 'model'\).*unknown: \['model'\]"),
    "config_missing_manual_dir": ({"data.manual_dir": "/no/such/ptbxl"},
                                  r"config.data.manual_dir='/no/such/ptbxl'"),
    "config_missing_teacher_checkpoint": ({"teacher.init": ""},
                                          r"config.teacher.init=''"),
    "config_best_metric_of_another_split": (
        {"ckpt.best_metric": "test/macro_auc"},
        r"config.ckpt.best_metric='test/macro_auc'"),
    "config_bad_epsilon": ({"loss.terms.ot.epsilon": 0.0},
                           r"config.loss.terms.ot.epsilon=0.0"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_error_names_field_and_value(case):
  overrides, match = CONFIG_CASES[case]
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.check(_distill(**overrides), num_devices=8,
                     model_names=models.MODELS, has_checkpoint=bool)


BUILD_CASES = {
    "config_lead_groups_vs_leads": ({"teacher.lead_groups": 5},
                                    r"config.teacher \(vit1d\) does not build"
                                    r".*lead_groups=5"),
    "config_mhca_heads_vs_width": ({"loss.terms.mhca.num_heads": 7},
                                   r"config.loss.terms.mhca.num_heads=7.*width"),
    "config_token_tap_is_pooled": ({"loss.taps.student_hidden": "pooled"},
                                   r"config.loss.taps.student_hidden="
                                   r"'pooled'.*\[B, N, D\]"),
    "config_unknown_tap": ({"loss.taps.teacher_ot": "block99"},
                           r"config.loss.taps.teacher_ot='block99'"),
}


@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_model_config_errors_before_compiling(case):
  overrides, match = BUILD_CASES[case]
  config = _distill(**overrides)
  objective = build.objective(config)
  with pytest.raises(config_lib.ConfigError, match=match):
    build.build_models(config, objective, (1, 1000, 12))


def test_every_case_is_documented():
  """docs/reliability.md has a row for every case id of this corpus."""
  with open(os.path.join(REPO, "docs", "reliability.md")) as f:
    doc = f.read()
  ids = (set(PTBXL_RECORDS) | set(CINC_RECORDS) | set(CONFIG_CASES)
         | set(BUILD_CASES) | {
             "ptbxl_unparsable_scp_codes", "ptbxl_scp_codes_code",
             "ptbxl_scp_codes_not_a_dict", "ptbxl_scp_codes_bad_likelihood",
             "ptbxl_duplicated_ecg_id", "ptbxl_missing_column",
             "ptbxl_missing_database_csv", "ptbxl_missing_statements_csv",
             "ptbxl_unknown_scp_code", "ptbxl_empty_split",
             "ptbxl_constant_zero_lead", "cinc_unknown_snomed", "cinc_257_hz",
             "cinc_bad_record_name", "cinc_zero_gain", "ckpt_other_config", "ckpt_corrupt_file",
             "ckpt_partial_write"})
  missing = sorted(i for i in ids if f"`{i}`" not in doc)
  assert not missing, f"docs/reliability.md lacks {missing}"
  assert len(ids) >= 25
