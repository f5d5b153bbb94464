"""Checkpoint retention (last N + best by a validation metric) and the config
stored with every step."""

import numpy as np
import pytest

from evl_ecg_jax import checkpoint


def _state(value):
  return {"params": {"w": np.full((2, 3), value, np.float32)},
          "step": np.int32(value)}


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 1)])
def test_keeps_the_last_n_and_the_best(tmp_path, mode, best):
  config = {"ckpt": {"best_metric": "validation/auc", "best_mode": mode}}
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, config=config,
                                 best_metric="validation/auc", best_mode=mode)
  scores = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: None, 6: 0.65}
  for step, score in scores.items():
    ckpt.save(step, _state(step), {"pos": step},
              metrics=None if score is None else {"validation/auc": score})
  ckpt.close()
  assert checkpoint.latest_step(str(tmp_path)) == 6
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit())
  assert kept == sorted({best, 5, 6})
  params = checkpoint.load_params(str(tmp_path), "best")
  np.testing.assert_array_equal(params["w"], np.full((2, 3), best))
  np.testing.assert_array_equal(checkpoint.load_params(str(tmp_path))["w"],
                                np.full((2, 3), 6))
  assert checkpoint.load_config(str(tmp_path)) == config


def test_without_a_metric_best_is_the_latest(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, config={})
  for step in (1, 2):
    ckpt.save(step, _state(step), {"pos": step})
  ckpt.close()
  np.testing.assert_array_equal(
      checkpoint.load_params(str(tmp_path), "best")["w"], np.full((2, 3), 2))
  with pytest.raises(ValueError, match="which='worst'"):
    checkpoint.load_params(str(tmp_path), "worst")


def test_config_diff_names_fields():
  assert checkpoint.config_diff({"a": {"b": 1, "c": 2}},
                                {"a": {"b": 1, "c": 3, "d": 4}}) == [
                                    "config.a.c: checkpoint 2, now 3",
                                    "config.a.d: checkpoint '<absent>', now 4"]
