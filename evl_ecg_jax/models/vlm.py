"""ECG vision-language model: printout image -> ViT -> projector -> LM.

The teacher sees 256 visual tokens and the student 64 (a 256 x 256 image at
patch 16 and 32, or patch 16 with `pool=2`); `VLM_PRESETS` holds tiny CPU
sizes and the paper-scale 2b / 7b ones (vocabulary given at build time).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from evl_ecg_jax.models import decoder as decoder_lib
from evl_ecg_jax.models import layers

_BF16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
_TINY_LM = dict(lm_width=96, lm_depth=2, lm_heads=3, lm_kv_heads=1,
                lm_mlp_dim=192)
VLM_PRESETS = {
    # head_dim 32 (XLA:CPU is slow at 16, see presets.py).
    "tiny_teacher": dict(patch_size=16, vit_width=64, vit_depth=2,
                         vit_heads=2, vit_mlp_dim=128, **_TINY_LM),
    "tiny_student": dict(patch_size=32, vit_width=32, vit_depth=1,
                         vit_heads=1, vit_mlp_dim=64, lm_width=64,
                         lm_depth=2, lm_heads=2, lm_kv_heads=1,
                         lm_mlp_dim=128),
    # ViT-L/16-shaped encoder; Gemma-2B-like and Mistral-7B-like LMs.
    "vlm_2b": dict(patch_size=16, vit_width=1024, vit_depth=24,
                   vit_heads=16, vit_mlp_dim=4096, lm_width=2048,
                   lm_depth=26, lm_heads=16, lm_kv_heads=4, lm_mlp_dim=8192,
                   remat=True, **_BF16),
    "vlm_7b": dict(patch_size=16, vit_width=1024, vit_depth=24,
                   vit_heads=16, vit_mlp_dim=4096, lm_width=4096,
                   lm_depth=30, lm_heads=32, lm_kv_heads=8, lm_mlp_dim=14336,
                   tie_embeddings=False, remat=True, **_BF16),
}


class ImageViT(nn.Module):
  """ViT over non-overlapping square patches of an image [B, H, W, C].

  Gives (H / p) * (W / p) / pool^2 tokens [B, N, width]: `pool` > 1
  average-pools pool x pool neighbouring tokens after the final LayerNorm.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pool: int = 1
  remat: bool = False
  scan: bool = False  # one nn.scan over the blocks (layers.encoder_stack).
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = image.shape
    p = self.patch_size
    if height % (p * self.pool) or width % (p * self.pool):
      raise ValueError(f"ImageViT: image {height}x{width} is not a multiple "
                       f"of patch_size * pool = {p * self.pool}.")
    rows, cols = height // p, width // p
    x = image.astype(self.dtype).reshape(batch, rows, p, cols, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, -1)
    x = layers.dense(self.width, ("channels_in", "embed"), name="embed",
                     **kw)(x)
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                        (None, None, None, "embed"))
    x = x + self.param("pos_embed", init, (1, rows, cols, self.width),
                       self.param_dtype)
    x = x.reshape(batch, rows * cols, self.width).astype(self.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = layers.encoder_stack(
        x, None, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, remat=self.remat, scan=self.scan, **kw)
    x = layers.norm("layer", name="ln_final", **kw)(x)
    if self.pool > 1:
      k = self.pool
      x = x.reshape(batch, rows // k, k, cols // k, k, self.width)
      x = x.mean(axis=(2, 4)).reshape(batch, -1, self.width)
    return layers.constrain(x, ("batch", "length", "embed"))


class ECGVLM(nn.Module):
  """Image ViT -> 2-layer GELU MLP projector -> Decoder over [visual; text].

  `__call__(image, tokens, mask=, taps=)` -> (logits [B, L, vocab] at the
  text positions, {tap: hidden}) with taps "visual" (ViT tokens
  [B, Nv, vit_width]), "projected" ([B, Nv, lm_width]) and the LM's
  "block{i}" / "hidden" at the text positions ([B, L, lm_width]).
  `encode_image(image)` -> (visual, projected); `decode(...)` is
  Decoder.__call__ (KV cache included); `generate` below samples captions.
  """
  vocab_size: int
  patch_size: int
  vit_width: int
  vit_depth: int
  vit_heads: int
  vit_mlp_dim: int
  lm_width: int
  lm_depth: int
  lm_heads: int
  lm_kv_heads: int
  lm_mlp_dim: int
  pool: int = 1
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  remat: bool = False
  scan: bool = False  # scanned ViT and LM stacks (layers.scanned).
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.vit = ImageViT(self.patch_size, self.vit_width, self.vit_depth,
                        self.vit_heads, self.vit_mlp_dim, self.pool,
                        self.remat, self.scan, **kw)
    self.proj_in = layers.dense(self.lm_width, ("embed", "mlp"), **kw)
    self.proj_out = layers.dense(self.lm_width, ("mlp", "embed"), **kw)
    self.lm = language_model(self)

  def encode_image(self, image):
    """-> (visual tokens [B, Nv, vit_width], projected [B, Nv, lm_width])."""
    visual = self.vit(image)
    h = layers.constrain(nn.gelu(self.proj_in(visual)),
                         ("batch", "length", "mlp"))
    projected = layers.constrain(self.proj_out(h),
                                 ("batch", "length", "embed"))
    return visual, projected

  def decode(self, tokens, **kwargs):
    """The LM alone (Decoder.__call__), e.g. with a projected prefix."""
    return self.lm(tokens, **kwargs)

  def __call__(self, image, tokens, *, mask=None, train: bool = False,
               taps: Optional[Sequence[str]] = ("hidden",)):
    del train  # no dropout; the train step passes it to every model.
    record = layers.Taps("ECGVLM", taps)
    visual, projected = self.encode_image(image)
    record("visual", visual)
    record("projected", projected)
    logits, hidden = self.lm(tokens, prefix=projected, mask=mask, taps=None)
    for name, x in hidden.items():
      record(name, x)
    return logits, record.result()


def language_model(vlm: ECGVLM, **kwargs) -> decoder_lib.Decoder:
  """The Decoder of `vlm` (its params are params["lm"]); kwargs such as
  parent=None build it outside the VLM."""
  return decoder_lib.Decoder(
      vlm.vocab_size, vlm.lm_width, vlm.lm_depth, vlm.lm_heads,
      vlm.lm_kv_heads, vlm.lm_mlp_dim, rope_base=vlm.rope_base,
      tie_embeddings=vlm.tie_embeddings, remat=vlm.remat, scan=vlm.scan,
      dtype=vlm.dtype,
      param_dtype=vlm.param_dtype, **kwargs)


def visual_tokens(vlm: ECGVLM, image_size: tuple[int, int]) -> int:
  """Number of visual tokens for an image of (height, width)."""
  step = vlm.patch_size * vlm.pool
  return (image_size[0] // step) * (image_size[1] // step)


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "eos_id", "pad_id", "use_cache",
    "return_logits"))
def generate(model: ECGVLM, params, image, prompt, *, max_new_tokens: int,
             mask=None, temperature=0.0, rng=None,
             eos_id: Optional[int] = None, pad_id: int = 0,
             use_cache: bool = True, return_logits: bool = False):
  """Captions of `image`: decoder.generate (arguments as there) with the
  projected visual tokens as the prefix of the prompt."""
  _, prefix = model.apply({"params": params}, image,
                          method=ECGVLM.encode_image)
  return decoder_lib.generate(
      language_model(model, parent=None), params["lm"], prompt,
      prefix=prefix, max_new_tokens=max_new_tokens, mask=mask,
      temperature=temperature, rng=rng, eos_id=eos_id, pad_id=pad_id,
      use_cache=use_cache, return_logits=return_logits)


def build(preset: str, vocab_size: int, **overrides) -> ECGVLM:
  """ECGVLM of `VLM_PRESETS[preset]` with `overrides` (e.g. pool=2)."""
  if preset not in VLM_PRESETS:
    raise ValueError(f"Unknown VLM preset {preset!r}; expected one of "
                     f"{sorted(VLM_PRESETS)}.")
  return ECGVLM(vocab_size=vocab_size, **{**VLM_PRESETS[preset],
                                          **overrides})
