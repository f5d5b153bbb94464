"""Decoder-only language model (the VLM's LM) with a KV cache and sampling.

Pre-RMSNorm blocks with rotary position embeddings (RoPE, Su et al. 2021),
grouped-query attention (GQA, Ainslie et al. 2023: `num_kv_heads` key/value
heads shared by `num_heads // num_kv_heads` query heads each) and a SwiGLU
MLP (Shazeer 2020). Every param and activation carries logical axis names
(layers.py): kernels (embed, heads), (embed, kv_heads), (heads, embed),
(embed, mlp), (mlp, embed); the token table (vocab, embed) and an untied
head (embed, vocab).

The KV cache is an explicit pytree (`init_cache`), passed in and returned:
  {"index": int32 [] next free slot,
   "mask": bool [B, S] slots holding a real token,
   "layers": ({"k": [B, S, kv_heads, head_dim], "v": same}, ...) per block
             (with `scan`: one {"k": [depth, B, S, ...], "v": same})}
Causality is by slot; RoPE positions default to the count of real tokens
before each slot, so left-padded prompts and padding between an embedding
prefix and the text are handled.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from evl_ecg_jax.models import layers

_NEG = jnp.finfo(jnp.float32).min


def rope(x, positions, base: float = 10000.0):
  """Rotates [B, L, heads, D] by angle position * base^(-2i / D) per pair
  (x_i, x_{i + D/2}); q.k then depends on positions only by difference."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


class DecoderBlock(nn.Module):
  """RMSNorm -> GQA self-attention (RoPE) -> RMSNorm -> SwiGLU, residual."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10000.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache=None, index=None):
    """x [B, L, D]; attn_mask bool [B, L, S]; cache {k, v} [B, S, K, Dh]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    batch, length, width = x.shape
    heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
    h = layers.norm("rms", name="ln1", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)
    split = lambda y, n, axes: layers.constrain(
        y.reshape(batch, length, n, dim), ("batch", "length", axes, "kv"))
    q = split(layers.dense(heads * dim, ("embed", "heads"), name="query",
                           **kw)(h), heads, "heads")
    k = split(layers.dense(kv_heads * dim, ("embed", "kv_heads"), name="key",
                           **kw)(h), kv_heads, "kv_heads")
    v = split(layers.dense(kv_heads * dim, ("embed", "kv_heads"),
                           name="value", **kw)(h), kv_heads, "kv_heads")
    q, k = rope(q, positions, self.rope_base), rope(k, positions,
                                                     self.rope_base)
    if cache is not None:
      put = lambda c, y: layers.constrain(
          lax.dynamic_update_slice(c, y.astype(c.dtype), (0, index, 0, 0)),
          ("batch", "length", "kv_heads", "kv"))
      cache = {"k": put(cache["k"], k), "v": put(cache["v"], v)}
      k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32)
    scores = jnp.where(attn_mask[:, None, None], scores * dim ** -0.5, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    y = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    y = y.reshape(batch, length, heads * dim)
    x = x + layers.dense(width, ("heads", "embed"), name="out", **kw)(y)
    h = layers.norm("rms", name="ln2", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)
    gate = layers.dense(self.mlp_dim, ("embed", "mlp"), name="gate", **kw)(h)
    up = layers.dense(self.mlp_dim, ("embed", "mlp"), name="up", **kw)(h)
    h = layers.constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + layers.dense(width, ("mlp", "embed"), name="down", **kw)(h)
    return layers.constrain(x, ("batch", "length", "embed")), cache


class _ScannedDecoderBlock(DecoderBlock):
  """DecoderBlock as an nn.scan body over (params, cache) per layer:
  (x, cache) -> (x, (x, cache)); the stacked x are the block taps."""

  def __call__(self, x, cache, positions, attn_mask, index):
    x, cache = super().__call__(x, positions, attn_mask, cache, index)
    return x, (x, cache)


class Decoder(nn.Module):
  """Decoder-only LM over tokens or embeddings, with an optional prefix.

  `__call__(inputs, prefix=, positions=, mask=, cache=, taps=)`:
    inputs: int tokens [B, L] or embeddings [B, L, width].
    prefix: optional embeddings [B, P, width] placed before `inputs` and
      always attended (the VLM's projected visual tokens).
    mask: optional [B, L], 1 where `inputs` holds a real token (padding is
      never attended to).
    positions: optional RoPE positions [B, P + L]; default: the number of
      real tokens before each slot (cache included).
    cache: optional KV cache (`init_cache`); the P + L new slots are written
      from cache["index"] on (the caller keeps index + P + L <= S).
  Returns (logits [B, L, vocab] in float32, {tap: hidden}) and, with a
  cache, the updated cache as a third element. Logits and taps cover the
  `inputs` positions only: "block{i}" (after block i) and "hidden" (final
  RMSNorm), each [B, L, width].
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: Optional[int] = None  # default width // num_heads.
  rope_base: float = 10000.0
  tie_embeddings: bool = True  # logits = hidden @ embedding table^T.
  remat: bool = False  # recompute each block in the backward pass.
  # One nn.scan over the blocks (params "blocks" with a leading "layers"
  # axis, the cache's "layers" stacked likewise) instead of "block{i}".
  scan: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @property
  def dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def setup(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Decoder: num_kv_heads={self.num_kv_heads} does not "
                       f"divide num_heads={self.num_heads}.")
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                        ("vocab", "embed"))
    self.embedding = self.param("embedding", init,
                                (self.vocab_size, self.width),
                                self.param_dtype)
    args = (self.num_heads, self.num_kv_heads, self.dim, self.mlp_dim,
            self.rope_base)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      self.blocks = layers.scanned(
          _ScannedDecoderBlock, depth=self.depth, remat=self.remat,
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast))(*args, **kw)
    else:
      block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
      self.blocks = [block(*args, name=f"block{i}", **kw)
                     for i in range(self.depth)]
    self.ln_final = layers.norm("rms", dtype=self.dtype,
                                param_dtype=self.param_dtype)
    if not self.tie_embeddings:
      self.head = layers.dense(self.vocab_size, ("embed", "vocab"),
                               dtype=jnp.float32, use_bias=False,
                               param_dtype=self.param_dtype)

  def embed(self, tokens):
    """Token embeddings [B, L, width] in the compute dtype."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return layers.constrain(x, ("batch", "length", "embed"))

  def __call__(self, inputs, *, prefix=None, positions=None, mask=None,
               cache=None, taps: Optional[Sequence[str]] = ("hidden",)):
    record = layers.Taps("Decoder", taps)
    x = (self.embed(inputs) if jnp.issubdtype(inputs.dtype, jnp.integer)
         else inputs.astype(self.dtype))
    batch, length = x.shape[:2]
    valid = (jnp.ones((batch, length), bool) if mask is None
             else mask.astype(bool))
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(self.dtype), x], axis=1)
      valid = jnp.concatenate(
          [jnp.ones(prefix.shape[:2], bool), valid], axis=1)
    total = x.shape[1]
    x = layers.constrain(x, ("batch", "length", "embed"))
    slot = jnp.arange(total)
    if cache is None:
      before, index, keys = jnp.zeros((batch,), jnp.int32), None, valid
      causal = slot[None, :] <= slot[:, None]
    else:
      index = cache["index"]
      before = cache["mask"].sum(-1, dtype=jnp.int32)
      keys = lax.dynamic_update_slice(cache["mask"], valid, (0, index))
      causal = (jnp.arange(keys.shape[1])[None, :]
                <= (index + slot)[:, None])
    if positions is None:
      positions = jnp.maximum(
          before[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    attn_mask = causal[None] & keys[:, None, :]
    x, outs, new_layers = self._blocks(x, positions, attn_mask, cache, index)
    for i, out in enumerate(outs):
      record(f"block{i}", out[:, total - length:])
    h = record("hidden", self.ln_final(x)[:, total - length:])
    if self.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", h.astype(jnp.float32),
                          self.embedding.astype(jnp.float32))
    else:
      logits = self.head(h)
    logits = layers.constrain(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits, record.result()
    cache = {"index": index + total, "mask": keys, "layers": new_layers}
    return logits, record.result(), cache

  def _blocks(self, x, positions, attn_mask, cache, index):
    """-> (x, [x after block i], the cache's new "layers")."""
    if self.scan:
      layer = None if cache is None else cache["layers"]
      x, (outs, layer) = self.blocks(x, layer, positions, attn_mask, index)
      return x, [outs[i] for i in range(self.depth)], layer
    outs, new_layers = [], []
    for i, block in enumerate(self.blocks):
      layer = None if cache is None else cache["layers"][i]
      x, layer = block(x, positions, attn_mask, layer, index)
      outs.append(x)
      new_layers.append(layer)
    return x, outs, tuple(new_layers)


def init_cache(model: Decoder, batch: int, max_len: int, dtype=None):
  """An empty KV cache of `max_len` slots (dtype: the model's compute one)."""
  dtype = model.dtype if dtype is None else dtype
  shape = (batch, max_len, model.num_kv_heads, model.dim)
  if model.scan:  # one stacked {k, v} scanned with the blocks.
    shape = (model.depth,) + shape
  kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return {"index": jnp.zeros((), jnp.int32),
          "mask": jnp.zeros((batch, max_len), bool),
          "layers": kv() if model.scan else tuple(
              kv() for _ in range(model.depth))}


def _stepper(model, apply, prompt, prefix, mask, max_new_tokens, pad_id,
             use_cache):
  """(prompt logits, state, step): `step(state, t, token)` -> (logits of
  the next token, state), with a KV cache or by recomputing everything."""
  batch, prompt_len = prompt.shape[:2]
  size = (0 if prefix is None else prefix.shape[1]) + prompt_len
  if use_cache:
    state = init_cache(model, batch, size + max_new_tokens)
    logits, _, state = apply(prompt, prefix=prefix, mask=mask, cache=state,
                             taps=())

    def step(cache, t, token):
      del t
      out, _, cache = apply(token[:, None], cache=cache, taps=())
      return out[:, -1], cache
    return logits, state, step
  logits, _ = apply(prompt, prefix=prefix, mask=mask, taps=())
  state = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  embedded = (prompt if prompt.ndim == 3 else
              apply(prompt, method=Decoder.embed)).astype(model.dtype)

  def recompute(generated, t, token):
    generated = generated.at[:, t].set(token)
    inputs = jnp.concatenate(
        [embedded, apply(generated, method=Decoder.embed)], axis=1)
    seen = jnp.arange(max_new_tokens) <= t
    full = jnp.concatenate(
        [mask.astype(bool), jnp.broadcast_to(seen, generated.shape)], 1)
    out, _ = apply(inputs, prefix=prefix, mask=full, taps=())
    return out[:, prompt_len + t], generated
  return logits, state, recompute


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "eos_id", "pad_id", "use_cache",
    "return_logits"))
def generate(model: Decoder, params, prompt, *, max_new_tokens: int,
             prefix=None, mask=None, temperature=0.0, rng=None,
             eos_id: Optional[int] = None, pad_id: int = 0,
             use_cache: bool = True, return_logits: bool = False):
  """Samples `max_new_tokens` continuations of a (left-padded) prompt.

  Args:
    model: the Decoder (static); params: its params.
    prompt: tokens [B, Lp] or embeddings [B, Lp, width], Lp >= 1, its last
      slot real (pad on the left, `mask` [B, Lp] marking real slots).
    max_new_tokens: output length T (static).
    prefix: optional embeddings [B, P, width] before the prompt.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / t)
      with `rng` (folded with the step index).
    eos_id: a sequence stops after emitting it; later slots get `pad_id`.
    use_cache: False recomputes the whole sequence at every step (the
      reference the cached path is tested against).
    return_logits: also return the logits each token was chosen from.

  Returns:
    {"tokens": int32 [B, T], "lengths": [B] tokens emitted (eos included)}
    (+ "logits" [B, T, vocab]); the loop stops once every sequence is done.
  """
  apply = functools.partial(model.apply, {"params": params})
  batch = prompt.shape[0]
  rng = jax.random.PRNGKey(0) if rng is None else rng
  mask = jnp.ones(prompt.shape[:2], bool) if mask is None else mask
  logits, state, step = _stepper(model, apply, prompt, prefix, mask,
                                 max_new_tokens, pad_id, use_cache)
  temperature = jnp.asarray(temperature, jnp.float32)

  def body(carry):
    t, state, last, tokens, done, kept = carry
    scaled = last / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(jax.random.fold_in(rng, t), scaled)
    token = jnp.where(temperature > 0, sampled, jnp.argmax(last, axis=-1))
    token = jnp.where(done, pad_id, token).astype(jnp.int32)
    tokens = tokens.at[:, t].set(token)
    if return_logits:
      kept = kept.at[:, t].set(last)
    if eos_id is not None:
      done = done | (token == eos_id)
    last, state = step(state, t, token)
    return t + 1, state, last, tokens, done, kept

  def cond(carry):
    return (carry[0] < max_new_tokens) & ~jnp.all(carry[4])

  first = logits[:, -1].astype(jnp.float32)
  kept = jnp.zeros((batch, max_new_tokens) + first.shape[-1:]
                   if return_logits else (), jnp.float32)
  carry = (jnp.zeros((), jnp.int32), state, first,
           jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((batch,), bool), kept)
  _, _, _, tokens, _, kept = lax.while_loop(cond, body, carry)
  out = {"tokens": tokens, "lengths": _lengths(tokens, eos_id)}
  if return_logits:
    out["logits"] = kept
  return out


def _lengths(tokens, eos_id):
  """[B] tokens emitted per row of [B, T], its eos included."""
  if eos_id is None:
    return jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
  is_eos = tokens == eos_id
  return jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1,
                   tokens.shape[1]).astype(jnp.int32)
