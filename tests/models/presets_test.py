"""Size presets: parameter counts without allocation, FLOPs per example."""

import jax
import jax.numpy as jnp
import pytest

from configs import default
from evl_ecg_jax import models
from evl_ecg_jax.models import presets

ECG = (1, 1000, 12)


@pytest.mark.parametrize("size,target", [("2b", 2.0e9), ("7b", 7.0e9)])
def test_paper_scale_parameter_counts(size, target):
  """eval_shape only: a 7B model is never allocated."""
  model = models.get(default.get_config(
      f"teacher_size={size},model=vit1d,student_size=tiny").teacher, 5)
  n = models.count_params(model, ECG)
  assert abs(n - target) <= 0.1 * target, f"{size}: {n:,}"


def test_every_preset_builds_and_sizes_grow():
  for family in presets.PRESETS:
    counts = []
    for size in presets.sizes(family):
      if size in ("2b", "7b"):
        continue  # counted above
      cfg = default.get_config(f"size={size},teacher={family},"
                               f"model={family}")
      for role in ("teacher", "student"):
        assert cfg[role].name == family
      counts.append(models.count_params(models.get(cfg.student, 5), ECG))
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        family, counts)


def test_large_presets_compute_in_bf16_with_f32_params():
  cfg = default.get_config("teacher_size=7b,model=vit1d,student_size=2b")
  for role in ("teacher", "student"):
    assert (cfg[role].dtype, cfg[role].param_dtype) == ("bfloat16", "float32")
    assert cfg[role].remat
  assert cfg.teacher.frozen_param_dtype == "bfloat16"
  assert default.get_config("").teacher.frozen_param_dtype == "float32"


def test_flops_per_example_matches_the_analytic_count():
  """ViT forward: 2 * tokens * (matmul params) + 4 * tokens^2 * width per
  block (QK^T and AV), plus the patch stem and embedding."""
  width, depth, mlp, n = 64, 2, 128, 250
  model = models.ViT1D(num_classes=5, patch_size=4, width=width, depth=depth,
                       num_heads=2, mlp_dim=mlp)
  matmul = depth * (4 * width * width + 2 * width * mlp)
  analytic = (2 * n * matmul + depth * 4 * n * n * width
              + 2 * n * (4 * 12) * width)
  flops = models.flops_per_example(model, ECG)
  assert abs(flops - analytic) <= 0.05 * analytic, (flops, analytic)
  # Linear in the batch: the helper reports one example.
  assert models.flops_per_example(model, (8, 1000, 12)) == flops


def test_abstract_variables_allocate_nothing():
  model = models.get(default.get_config(
      "teacher_size=7b,model=vit1d,student_size=tiny").teacher, 5)
  leaves = jax.tree.leaves(models.abstract_variables(model, ECG))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
