"""kd_table reuses a finished run only when it ran the same objective
(benchmarks/_runs.py)."""

import json
import os
import sys

import pytest

from configs import default
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import _runs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _finished(workdir, config):
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  (workdir / "metrics.json").write_text("{}")


def test_a_run_of_another_loss_under_the_same_name_is_an_error(tmp_path):
  """Reused: the same loss config; refused, naming the field: another one,
  also when the stored config predates the field."""
  config = default.get_config("mode=distill,loss=evl")
  assert not _runs.reusable(config, str(tmp_path / "none"))
  _finished(tmp_path / "same", config)
  assert _runs.reusable(config, str(tmp_path / "same"))
  older = default.get_config("mode=distill,loss=evl")
  older.loss.terms.relation.batch_form = "cosine"
  _finished(tmp_path / "older", older)
  with pytest.raises(ValueError, match=r"older: .*loss.terms.relation."
                     r"batch_form: stored \['cosine'\], wanted \['angle'\]"):
    _runs.reusable(config, str(tmp_path / "older"))
  # A run older than the field ran the part's default ("cosine").
  before = json.loads(json.dumps(older.to_dict()))
  del before["loss"]["terms"]["relation"]["batch_form"]
  (tmp_path / "older" / "config.json").write_text(json.dumps(before))
  with pytest.raises(ValueError, match="relation.batch_form"):
    _runs.reusable(config, str(tmp_path / "older"))
  assert _runs.reusable(older, str(tmp_path / "older"))
