"""Each mode runs end to end on the tiny synthetic split (runlocal configs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from conftest import REPO
from conftest import set_fields
from evl_ecg_jax import checkpoint
from evl_ecg_jax import config as config_lib
from evl_ecg_jax.train import loop


def _config(arg, tfds_dir, **overrides):
  config = default.get_config(arg + ",runlocal")
  config.data.data_dir = tfds_dir
  return set_fields(config, overrides)


@pytest.fixture(scope="module")
def teacher_dir(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.fit(_config("mode=train_teacher", tfds_dir), workdir)
  return workdir


def test_train_teacher_writes_everything(teacher_dir):
  assert checkpoint.latest_step(teacher_dir) == 4
  with open(os.path.join(teacher_dir, "metrics.json")) as f:
    metrics = json.load(f)
  for split in ("validation", "test"):
    assert 0.0 <= metrics[f"{split}/macro_auc"] <= 1.0
    assert metrics[f"{split}/n"] == 64  # every example, none dropped
  assert {f"test/auc/{c}" for c in ("NORM", "MI", "STTC", "CD", "HYP")} <= set(
      metrics)
  with open(os.path.join(teacher_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  assert os.listdir(os.path.join(teacher_dir, "tensorboard"))


def test_distill_and_evaluate(evl_run, tfds_dir, tmp_path):
  """mode=evaluate of a distilled student (the EVL run below, whose loss
  includes logit KD) reproduces its metrics and keeps its config.json."""
  workdir, metrics = evl_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  assert {"train/ce", "train/kd", "train/loss"} <= set(last)
  with open(os.path.join(workdir, "config.json")) as f:
    trained_config = json.load(f)
  evaluated = loop.fit(_config("mode=evaluate", tfds_dir), workdir)
  for key in ("test/macro_auc", "validation/macro_auc"):
    np.testing.assert_allclose(evaluated[key], metrics[key], rtol=1e-6)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == trained_config  # provenance kept
  with pytest.raises(config_lib.ConfigError, match="mode=evaluate expected"):
    loop.fit(_config("mode=evaluate", tfds_dir), str(tmp_path / "empty"))


EVL_TERMS = {"train/ce", "train/kd", "train/mhca",
             "train/mhca_reconstruction", "train/relation", "train/ot"}


def _check_diagnostics(metrics, terms):
  """metrics.json summarises the distillation diagnostics of the run."""
  for term in terms:
    assert metrics[f"diag/grad_share/{term}"] > 0.0, term
    assert -1.0 <= metrics[f"diag/teacher_grad_cos/{term}"] <= 1.0, term
    assert np.isfinite(metrics[f"diag_mean/teacher_value_gap/{term}"]), term
  # Pooled embeddings are tapped for the relation term only.
  for key in ("cka/tokens", "cka/tokens_shuffled") + (
      ("cka/pooled",) if "relation" in terms else ()):
    assert 0.0 <= metrics[f"diag/{key}"] <= 1.0 + 1e-6, key
  if "ot" in terms:
    assert 1.0 <= metrics["diag/ot/plan_perplexity"]
    assert 0.0 <= metrics["diag/ot/diagonal_mass"] <= 1.0


# The ablations, the baselines, the heterogeneous students and the teacher
# cache run under `make test-slow`: switching a term off and each
# baseline's loss are unit-tested in tests/losses, EVL and KD train here,
# a lead-I EVL student trains in tests/train/transfer_test.py, and the
# default suite keeps to a modest machine (issue 21).
_SLOW = pytest.mark.slow


def _distill_evl(variant, teacher_dir, tfds_dir, workdir):
  # Four records a device: relations across the records of a batch are
  # computed per device and are degenerate below three.
  return loop.fit(_config(f"mode=distill,loss={variant}", tfds_dir,
                          **{"teacher.init": teacher_dir,
                             "data.batch_size": 32}), workdir)


@pytest.fixture(scope="module")
def evl_run(teacher_dir, tfds_dir, tmp_path_factory):
  """(workdir, metrics) of the shipped EVL distillation, shared by the
  tests that read a distilled run."""
  workdir = str(tmp_path_factory.mktemp("evl"))
  return workdir, _distill_evl("evl", teacher_dir, tfds_dir, workdir)


@pytest.mark.parametrize("variant,absent", [
    ("evl", set()),
    pytest.param("evl_no_mhca", {"train/mhca", "train/mhca_reconstruction"},
                 marks=_SLOW),
    pytest.param("evl_no_rel", {"train/relation"}, marks=_SLOW),
    pytest.param("evl_no_ot", {"train/ot"}, marks=_SLOW)])
def test_distill_evl_and_ablations(teacher_dir, tfds_dir, tmp_path, evl_run,
                                   variant, absent):
  if variant == "evl":
    workdir, metrics = evl_run
  else:
    workdir = str(tmp_path / variant)
    metrics = _distill_evl(variant, teacher_dir, tfds_dir, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f if "train/loss" in line][-1]
  assert EVL_TERMS - absent <= set(last) and not absent & set(last)
  assert all(np.isfinite(v) for k, v in last.items() if k.startswith("train"))
  # The checkpoint holds the student and the learned heads; eval reads the
  # student alone.
  params = checkpoint.load_params(workdir)
  assert set(params) == {"model", "heads"}
  assert ("ot_projection" in params["heads"]) == ("train/ot" not in absent)
  _check_diagnostics(metrics, {"kd", "mhca", "relation", "ot"} - {
      k.split("/")[1] for k in absent})
  assert 0.0 <= metrics["test/macro_auc"] <= 1.0


@pytest.mark.parametrize("variant,overrides", [
    # The two settings: an XResNet1D student of the ViT teacher, and
    # a lead-I (wearable) student of the 12-lead teacher, here with MHCA and
    # relation on intermediate layers and the teacher frozen in bfloat16.
    # (XResNet1D itself trains in tests/models; its distillation run is slow.)
    pytest.param("model=xresnet1d", {}, marks=_SLOW),
    pytest.param("student_leads=I", {"loss.taps.student_hidden": "stage2",
                                      "loss.taps.teacher_hidden": "block1",
                                      "teacher.frozen_param_dtype": "bfloat16"},
                 marks=_SLOW),
])
def test_heterogeneous_students_distil(teacher_dir, tfds_dir, tmp_path,
                                       variant, overrides):
  workdir = str(tmp_path / "student")
  metrics = loop.fit(_config(f"mode=distill,loss=evl,{variant}", tfds_dir,
                             **{"teacher.init": teacher_dir}, **overrides),
                     workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f if "train/loss" in line][-1]
  assert EVL_TERMS <= set(last)
  assert all(np.isfinite(v) for k, v in last.items() if k.startswith("train"))
  params = checkpoint.load_params(workdir)
  if variant == "student_leads=I":
    assert params["model"]["stem"]["kernel"].shape[1] == 1  # one input lead
  else:
    assert metrics["model"] == "xresnet1d"
  assert 0.0 <= metrics["test/macro_auc"] <= 1.0


@pytest.mark.parametrize("variant,terms,heads", [
    pytest.param("fitnet", {"fitnet"}, {"fitnet"}, marks=_SLOW),
    pytest.param("tinybert", {"kd", "tinybert"},
                 {"tinybert0", "tinybert1", "tinybert2"}, marks=_SLOW),
    pytest.param("rkd", {"rkd"}, None, marks=_SLOW),
    pytest.param("dkd", {"dkd"}, None, marks=_SLOW),
    pytest.param("uld", {"uld"}, None, marks=_SLOW),
    pytest.param("crd", {"crd"}, {"crd_student", "crd_teacher"},
                 marks=_SLOW),
    pytest.param("dist", {"dist"}, None, marks=_SLOW)])
def test_baselines_train_through_the_same_step(teacher_dir, tfds_dir, tmp_path,
                                               variant, terms, heads):
  # The labels protocol rides along: a quarter of the records keep labels.
  workdir = str(tmp_path / variant)
  loop.fit(_config(f"mode=distill,loss={variant}", tfds_dir,
                   **{"teacher.init": teacher_dir,
                      "data.label_fraction": 0.25}), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f if "train/loss" in line][-1]
  logged = {k[len("train/"):] for k in last if k.startswith("train/")} - {
      "loss", "ce", "grad_norm", "learning_rate", "skipped_steps"}
  assert logged == terms
  assert last["train/skipped_steps"] == 0
  assert all(np.isfinite(v) for k, v in last.items() if k.startswith("train"))
  params = checkpoint.load_params(workdir)
  assert (set(params.get("heads", {})) or None) == heads


@_SLOW  # the cache serves benchmarks/kd_table.py
def test_cached_teacher_gives_the_online_result(teacher_dir, tfds_dir,
                                                tmp_path):
  """A feature loss (FitNet on the teacher's tokens) with the teacher's
  outputs read from the store = with the teacher run in every step (same
  params after the run, within float noise)."""
  params = {}
  for cache in (False, True):
    workdir = str(tmp_path / f"cache_{cache}")
    loop.fit(_config("mode=distill,loss=fitnet", tfds_dir,
                     **{"teacher.init": teacher_dir,
                        "teacher.cache_features": cache}), workdir)
    params[cache] = checkpoint.load_params(workdir)
  # Adam turns float noise in a near-zero gradient into a step of up to
  # lr = 1e-3 per update; 1e-4 after 4 updates still catches any real
  # difference in what the teacher said.
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               params[False], params[True])
  stores = os.listdir(os.path.join(teacher_dir, "teacher_store"))
  assert len(stores) == 1 and not stores[0].startswith(".tmp")
  root = os.path.join(teacher_dir, "teacher_store", stores[0])
  shard = os.path.join(root, "shard-00000")
  assert {"logits.npy", "tokens.npy", "ids.npy"} <= set(os.listdir(shard))
  # The stored rows are the teacher's outputs for those records, in order.
  from evl_ecg_jax import models  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import teacher_store  # pylint: disable=g-import-not-at-top
  config = _config("mode=distill,loss=fitnet", tfds_dir,
                   **{"teacher.init": teacher_dir})
  teacher = models.get(config.teacher, 5)
  teacher_params = checkpoint.load_params(teacher_dir)["model"]
  source = teacher_store.jax_source(config, teacher, teacher_params,
                                    ("tokens",))
  spec = teacher_store.manifest(config, source)
  rows = teacher_store.load(root, spec)
  src = pipeline.source(config.data, "train")
  picks = [0, 5, len(src) - 1]
  np.testing.assert_array_equal([rows["id"][i] for i in picks],
                                [src[i]["id"] for i in picks])
  logits, feats = teacher.apply(
      {"params": teacher_params},
      np.stack([src[i]["ecg"] for i in picks]), taps=("tokens",))
  np.testing.assert_allclose([rows["teacher/logits"][i] for i in picks],
                             logits, atol=1e-5)
  np.testing.assert_allclose([rows["teacher/tokens"][i] for i in picks],
                             feats["tokens"], atol=1e-4)
  # A later run finds the complete store and writes nothing.
  before = {n: os.path.getmtime(os.path.join(root, n))
            for n in os.listdir(root)}
  teacher_store.write(config, source, root, spec)
  assert before == {n: os.path.getmtime(os.path.join(root, n))
                    for n in os.listdir(root)}
  with pytest.raises(config_lib.ConfigError, match="cache_features=True "
                     "with training augmentations"):
    loop.fit(_config("mode=distill,loss=fitnet", tfds_dir,
                     **{"teacher.init": teacher_dir,
                        "teacher.cache_features": True,
                        "data.transforms.noise_std": 0.01}),
             str(tmp_path / "augmented"))


def test_unknown_feature_tap_is_a_config_error(teacher_dir, tfds_dir,
                                               tmp_path):
  config = _config("mode=distill,loss=evl", tfds_dir,
                   **{"teacher.init": teacher_dir,
                      "loss.taps.teacher_hidden": "block9"})
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.loss.taps.teacher_hidden='block9'.*"
                     r"'block2'"):
    loop.fit(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# Slow: tests/train/preemption_test.py resumes the documented command after
# SIGTERM and SIGKILL and checks the same bit-identical result.
@_SLOW
def test_resume_gives_the_uninterrupted_result(tfds_dir, tmp_path):
  straight = str(tmp_path / "straight")
  loop.fit(_config("mode=distill,loss=ce", tfds_dir), straight)
  resumed = str(tmp_path / "resumed")
  loop.fit(_config("mode=distill,loss=ce", tfds_dir), resumed)
  # Drop the final checkpoint: the rerun resumes at step 2 (state + data).
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(checkpoint.directory(resumed), "4"))
  assert checkpoint.latest_step(resumed) == 2
  loop.fit(_config("mode=distill,loss=ce", tfds_dir), resumed)
  a, b = (checkpoint.load_params(d) for d in (straight, resumed))
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "evl_ecg_jax.main", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)


def test_cli_unknown_config_key_fails_with_its_name(tmp_path):
  proc = _cli("--config=configs/default.py:runlocal",
              f"--workdir={tmp_path}", "--config.some_unknown_key=1")
  assert proc.returncode != 0
  assert "some_unknown_key" in proc.stderr
  assert "Unknown config field" in proc.stderr
  assert not os.listdir(tmp_path)  # failed before anything ran


def test_cli_missing_teacher_checkpoint_fails_fast(tmp_path):
  missing = tmp_path / "no_teacher"
  proc = _cli("--config=configs/default.py:mode=distill,loss=kd,runlocal",
              f"--workdir={tmp_path / 'run'}",
              f"--config.teacher.init={missing}")
  assert proc.returncode != 0
  assert "config.teacher.init" in proc.stderr
  assert str(missing) in proc.stderr
  assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_cli_prepare_only_builds_the_data_and_trains_nothing(tmp_path):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  proc = _cli("--config=configs/default.py:mode=train_teacher,runlocal",
              f"--workdir={workdir}",
              f"--config.data.data_dir={data_dir}", "--prepare_only")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "synthetic_ecg/tiny" in proc.stdout and "ready in" in proc.stdout
  # Every split a run reads is prepared (a later run builds nothing) ...
  for split in ("train", "validation", "test"):
    assert list((data_dir / "synthetic_ecg" / "tiny").glob(
        f"*/synthetic_ecg-{split}.array_record*")), split
  # ... and nothing was trained or checkpointed.
  assert not checkpoint.has_checkpoint(str(workdir))
  assert not (workdir / "metrics.json").exists()
