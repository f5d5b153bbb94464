"""Size presets of every model family, and their token geometry.

`configs/*.py` expand a preset into the model block of the config (every
field stays visible and overridable, e.g. --config.teacher.depth=8).
Parameter counts are computed with `jax.eval_shape` (no allocation) by
`models.count_params`; tests/models/presets_test.py checks 2b and 7b.

Large presets compute in bfloat16 with float32 params ("param f32, compute
bf16"); 2b / 7b also rematerialise each transformer block and scan the
blocks (one compiled block: docs/scale.md has compile time and memory
against the unrolled stack). Every vit1d block has the `scan` field, so
`--config.student.scan=true` works at any size.
"""

from __future__ import annotations

_BF16 = dict(dtype="bfloat16", param_dtype="float32")

PRESETS = {
    "vit1d": {
        # head_dim 32: XLA:CPU runs batched matmuls of head_dim 16 ~3x slower.
        "tiny": dict(width=64, depth=3, num_heads=2, mlp_dim=128,
                     stem_features=32),
        "small": dict(width=192, depth=6, num_heads=6, mlp_dim=768,
                      stem_features=64),
        "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                     stem_features=64, **_BF16),
        "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                      stem_features=64, **_BF16),
        "2b": dict(width=2048, depth=40, num_heads=16, mlp_dim=8192,
                   stem_features=128, remat=True, scan=True, **_BF16),
        "7b": dict(width=4096, depth=35, num_heads=32, mlp_dim=16384,
                   stem_features=128, remat=True, scan=True, **_BF16),
    },
    "cnn1d": {
        # ~15k parameters: the edge student of the demo.
        "tiny": dict(widths=(8, 16, 24, 32), blocks_per_stage=1),
        "small": dict(widths=(32, 64, 96, 128), blocks_per_stage=2),
        "base": dict(widths=(64, 128, 256, 512), blocks_per_stage=2),
    },
    "xresnet1d": {
        "tiny": dict(stem_widths=(16, 16, 32), widths=(16, 16, 32, 32),
                     blocks=(1, 1, 1, 1), expansion=1),
        # xresnet1d18-shaped.
        "small": dict(stem_widths=(32, 32, 64), widths=(64, 128, 256, 512),
                      blocks=(2, 2, 2, 2), expansion=1),
        # xresnet1d50 and xresnet1d101 of Strodthoff et al. 2021.
        "base": dict(stem_widths=(32, 32, 64), widths=(64, 128, 256, 512),
                     blocks=(3, 4, 6, 3), expansion=4),
        "large": dict(stem_widths=(32, 32, 64), widths=(64, 128, 256, 512),
                      blocks=(3, 4, 23, 3), expansion=4, **_BF16),
    },
    "convnext1d": {
        "tiny": dict(widths=(16, 24, 32, 48), depths=(1, 1, 1, 1)),
        "small": dict(widths=(48, 96, 192, 384), depths=(2, 2, 6, 2)),
        # ConvNeXt-T and ConvNeXt-B stage shapes.
        "base": dict(widths=(96, 192, 384, 768), depths=(3, 3, 9, 3),
                     **_BF16),
        "large": dict(widths=(128, 256, 512, 1024), depths=(3, 3, 27, 3),
                      **_BF16),
    },
}
# Total time downsampling of the conv families apart from their stem.
_CONV_STRIDE = {"xresnet1d": 16, "convnext1d": 8}


def sizes(family: str) -> tuple[str, ...]:
  return tuple(PRESETS[_known(family)])


def _known(family: str) -> str:
  if family not in PRESETS:
    raise ValueError(f"Unknown model family {family!r}; expected one of "
                     f"{sorted(PRESETS)}.")
  return family


def token_geometry(family: str, *, samples: int, tokens: int) -> dict:
  """Patch size / stem stride giving about `tokens` tokens for `samples`.

  ViT1D: patch_size = round(samples / tokens) (250 tokens for 1000 samples
  and 256 asked; 63 for 64). Conv families: the stem stride that brings the
  total downsampling nearest samples / tokens. CNN1D has a fixed stride of
  16 (no field).
  """
  if family == "vit1d":
    return dict(patch_size=max(1, round(samples / tokens)))
  if family in _CONV_STRIDE:
    stride = max(1, round(samples / (tokens * _CONV_STRIDE[family])))
    return dict(stem_stride=stride)
  _known(family)
  return {}


def model_config(family: str, size: str, *, samples: int,
                 tokens: int) -> dict:
  """The fields of one model block: preset + token geometry + dtypes."""
  if size not in PRESETS[_known(family)]:
    raise ValueError(f"Model {family!r} has no size {size!r}; presets: "
                     f"{list(PRESETS[family])}.")
  scan = {"scan": False} if family == "vit1d" else {}
  return {"name": family, "dtype": "float32", "param_dtype": "float32",
          **scan, **PRESETS[family][size],
          **token_geometry(family, samples=samples, tokens=tokens)}
