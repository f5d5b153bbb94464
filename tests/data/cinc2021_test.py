"""The cinc2021 builder on the shared Challenge records, and its pieces.

Needs ../shared/data/cinc (real Challenge 2020-21 records beside the repo,
present in CI); without it the tests that read it skip and say so.
"""

import collections
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO
from evl_ecg_jax.data import cinc
from evl_ecg_jax.data import transforms
from evl_ecg_jax.data.builders import cinc2021

ROOT = os.path.join(os.path.dirname(REPO), "shared", "data", "cinc")
needs_data = pytest.mark.skipif(
    not os.path.isdir(ROOT),
    reason=f"{ROOT} not found: these tests read the real Challenge records "
    "that lie beside the repo (../shared/data/cinc, present in CI).")


def _build(manual_dir, data_dir, **config):
  cfg = cinc2021.Cinc2021Config(name="custom", **config) if config else "500hz"
  builder = tfds.builder("cinc2021", config=cfg, data_dir=str(data_dir),
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


def _headers():
  """{record: (prefix, [Dx codes])} read as plain text from the .hea files."""
  out = {}
  for name in sorted(os.listdir(ROOT)):
    if name.endswith(".hea"):
      with open(os.path.join(ROOT, name)) as f:
        dx = re.search(r"^#\s*Dx:\s*(.*)$", f.read(), re.MULTILINE).group(1)
      out[name[:-4]] = (re.match(r"[A-Z]+", name).group(),
                        [c.strip() for c in dx.split(",")])
  return out


@needs_data
def test_builds_splits_per_source_with_label_counts_from_the_headers(
    tmp_path):
  builder = _build(ROOT, tmp_path)
  headers = _headers()
  prefixes = collections.Counter(p for p, _ in headers.values())
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sum(splits.values()) == len(headers) == 35
  assert splits["cpsc2018"] == prefixes["A"] == 6
  assert splits["g12ec"] == prefixes["E"] and splits["ptb"] == prefixes["S"]
  assert splits["chapman_shaoxing"] + splits["ningbo"] == prefixes["JS"]
  expected = collections.Counter()
  for _, codes in headers.values():
    for name, class_codes in cinc.SCORED_CLASSES:
      expected[name] += any(c in class_codes for c in codes)
  counted = collections.Counter()
  by_record = {}
  for split in splits:
    source = tfds.data_source("cinc2021/500hz", split=split,
                              data_dir=str(tmp_path),
                              builder_kwargs={"file_format": "array_record"})
    for ex in source:
      assert ex["ecg"].shape == (5000, 12) and np.all(np.isfinite(ex["ecg"]))
      by_record[ex["record"].decode()] = ex
      for name, hot in zip(cinc.CLASS_NAMES, ex["labels"]):
        counted[name] += int(hot)
  assert counted == expected
  # Hand-checked records: an equivalence pair, an unscored-only record, and
  # the 1000 Hz PTB record resampled to 500 Hz and cropped to 10 s.
  names = lambda rec: {n for n, h in zip(cinc.CLASS_NAMES,
                                         by_record[rec]["labels"]) if h}
  assert names("A0001") == {"CRBBB|RBBB"}
  assert "PVC|VPB" in names("E00008")  # 17338001 (VPB) scores as PVC
  assert names("A0008") == set()  # 429622005 is not scored
  assert by_record["S0001"]["valid_length"] == 5000
  assert by_record["A0004"]["valid_length"] == 5000  # 5974 -> first 10 s


def test_source_database_from_the_record_prefix():
  assert cinc.source_database("A0001") == "cpsc2018"
  assert cinc.source_database("HR00003") == "ptb_xl"
  assert cinc.source_database("JS10646") == "chapman_shaoxing"
  assert cinc.source_database("JS10647") == "ningbo"
  with pytest.raises(cinc.BadRecord, match="record X0001: unknown prefix"):
    cinc.source_database("X0001")


def test_resampling_keeps_frequency_and_crop_pad_keeps_length():
  t = np.arange(3000) / 1000.0
  x = np.sin(2 * np.pi * 5 * t)[:, None].repeat(12, 1).astype(np.float32)
  y = transforms.resample(x, 1000, 500)
  assert y.shape == (1500, 12)
  np.testing.assert_allclose(y[100:-100, 0],
                             np.sin(2 * np.pi * 5 * np.arange(1500) / 500)
                             [100:-100], atol=1e-3)
  padded, valid = cinc.crop_or_pad(y, 2000)
  assert valid == 1500 and padded.shape == (2000, 12)
  np.testing.assert_array_equal(padded[1500:], 0.0)
  cropped, valid = cinc.crop_or_pad(y, 1000)
  assert valid == 1000 and np.array_equal(cropped, y[:1000])


def test_scored_labels_and_header_fields():
  hot = cinc.scored_labels("59118001, 429622005,164909002")
  assert {n for n, h in zip(cinc.CLASS_NAMES, hot) if h} == {
      "CRBBB|RBBB", "CLBBB|LBBB"}
  assert len(cinc.CLASS_NAMES) == 26
  fields = cinc.header_fields(["Age: 74", " Dx: 1,2", "Sex: Female"])
  assert fields == {"Age": "74", "Dx": "1,2", "Sex": "Female"}


@needs_data
def test_bad_records_fail_with_their_name_or_are_skipped_and_counted(
    tmp_path):
  root = tmp_path / "cinc"
  root.mkdir()
  for name in ("A0001", "A0002", "E00003", "Q0004"):
    for ext in (".hea", ".mat"):
      shutil.copy(os.path.join(ROOT, name + ext), root)
  (root / "A0002.mat").write_bytes((root / "A0002.mat").read_bytes()[:500])
  (root / "E00003.hea").unlink()
  (root / "E00003.mat").unlink()
  (root / "E00003.hea").write_text("")  # empty header
  hea = (root / "Q0004.hea").read_text().splitlines()  # 11 leads
  hea[0] = hea[0].replace(" 12 ", " 11 ", 1)
  (root / "Q0004.hea").write_text("\n".join(hea[:12] + hea[13:]) + "\n")
  with pytest.raises(cinc.BadRecord, match=r"record \w+: .*skip_bad_records"):
    _build(root, tmp_path / "fail", sampling_rate=500, duration_s=10)
  builder = _build(root, tmp_path / "skip", sampling_rate=500, duration_s=10,
                   skip_bad_records=True)
  counts = builder.info.metadata["build_counts"]
  assert sum(c.get("skipped", 0) for c in counts.values()) == 3
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "cpsc2018": 1}
  assert builder.info.metadata["empty_sources"] == ["cpsc_extra", "g12ec"]
  for name, match in (("A0002", "unreadable|holds"),
                      ("E00003", r"\.mat not found"), ("Q0004", "leads")):
    with pytest.raises(cinc.BadRecord, match=f"record {name}: .*({match})"):
      cinc.read_record(str(root / name))
