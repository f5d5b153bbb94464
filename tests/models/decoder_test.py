"""Decoder LM: shapes, causality, RoPE, GQA, KV cache and generation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evl_ecg_jax.models import decoder

VOCAB, B, L, NEW = 32, 2, 6, 5
# head_dim 32 (width / num_heads); 2 query heads share 1 key/value head.
KW = dict(vocab_size=VOCAB, width=64, depth=2, num_heads=2, num_kv_heads=1,
          mlp_dim=128)


def _tokens(seed=0, shape=(B, L)):
  return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, shape),
                     jnp.int32)


def _init(model, tokens):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens))["params"]


@pytest.fixture(scope="module")
def lm():
  model = decoder.Decoder(**KW)
  return model, _init(model, _tokens())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_and_taps(dtype):
  model = decoder.Decoder(**KW, tie_embeddings=False, dtype=dtype)
  tokens = _tokens()
  params = _init(model, tokens)
  assert params["head"]["kernel"].shape == (64, VOCAB)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, taps = model.apply({"params": params}, tokens, taps=None)
  assert logits.shape == (B, L, VOCAB) and logits.dtype == jnp.float32
  assert sorted(taps) == ["block0", "block1", "hidden"]
  for x in taps.values():
    assert x.shape == (B, L, 64) and x.dtype == dtype
  assert np.isfinite(logits).all()
  # Embeddings in place of tokens give the same result.
  embedded = model.apply({"params": params}, tokens,
                         method=decoder.Decoder.embed)
  again, _ = model.apply({"params": params}, embedded)
  np.testing.assert_allclose(again, logits, atol=1e-6)
  with pytest.raises(ValueError, match="unknown feature tap"):
    model.apply({"params": params}, tokens, taps=("tokens",))


def test_num_kv_heads_must_divide_num_heads():
  with pytest.raises(ValueError, match="does not divide"):
    _init(decoder.Decoder(**{**KW, "num_heads": 2, "num_kv_heads": 3}),
          _tokens())


def test_causal(lm):
  model, params = lm
  tokens = _tokens()
  changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % VOCAB)
  a, _ = model.apply({"params": params}, tokens)
  b, _ = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :3], b[:, :3])
  assert np.abs(a[:, 3:] - b[:, 3:]).max() > 1e-3


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
          for _ in range(2))
  score = lambda m, n: float(jnp.sum(
      decoder.rope(q, jnp.array([[m]])) * decoder.rope(k, jnp.array([[n]]))))
  assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_shifting_all_positions_leaves_logits_unchanged(lm):
  model, params = lm
  tokens = _tokens()
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  a, _ = model.apply({"params": params}, tokens, positions=positions)
  b, _ = model.apply({"params": params}, tokens, positions=positions + 37)
  np.testing.assert_allclose(a, b, atol=1e-4)
  c, _ = model.apply({"params": params}, tokens, positions=positions * 2)
  assert np.abs(a - c).max() > 1e-3  # positions do matter.


def _reference_logits(p, tokens, num_heads, num_kv_heads, base=10000.0):
  """Plain multi-head attention in float64 numpy, written out by hand; key
  and value heads are repeated for GQA (query head h reads kv head
  h // (num_heads // num_kv_heads))."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  tokens = np.asarray(tokens)
  rms = lambda x, s: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * s
  x = p["embedding"][tokens]
  batch, length, _ = x.shape
  pos = np.arange(length)
  for i in range(2):
    b = p[f"block{i}"]
    h = rms(x, b["ln1"]["scale"])
    heads = lambda w, n: (h @ w).reshape(batch, length, n, -1)
    q = heads(b["query"]["kernel"], num_heads)
    k = heads(b["key"]["kernel"], num_kv_heads)
    v = heads(b["value"]["kernel"], num_kv_heads)
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    dim = q.shape[-1]
    half = dim // 2
    theta = pos[:, None] * base ** (-np.arange(half) / half)  # [L, half]
    rot = lambda y: ((y[..., :half] + 1j * y[..., half:])
                     * np.exp(1j * theta)[None, :, None])
    q, k = (np.concatenate([r.real, r.imag], -1) for r in (rot(q), rot(k)))
    s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(dim)
    s = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhls,bshd->blhd", a, v).reshape(batch, length, -1)
    x = x + o @ b["out"]["kernel"]
    h = rms(x, b["ln2"]["scale"])
    g = h @ b["gate"]["kernel"]
    x = x + (g / (1 + np.exp(-g)) * (h @ b["up"]["kernel"])) @ (
        b["down"]["kernel"])
  return rms(x, p["ln_final"]["scale"]) @ p["embedding"].T


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_attention_equals_hand_written_multi_head_reference(kv_heads):
  """kv_heads == num_heads is plain MHA; kv_heads=1 is GQA (MQA here)."""
  model = decoder.Decoder(**{**KW, "num_kv_heads": kv_heads})
  tokens = _tokens(1)
  params = _init(model, tokens)
  logits, _ = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(
      logits, _reference_logits(params, tokens, 2, kv_heads), atol=1e-4)


def test_left_padding_is_invisible(lm):
  """A left-padded row gives the logits of the same row unpadded."""
  model, params = lm
  tokens = _tokens(2)
  padded = jnp.concatenate([jnp.zeros((B, 2), jnp.int32), tokens], 1)
  mask = jnp.arange(L + 2) >= 2
  a, _ = model.apply({"params": params}, tokens)
  b, _ = model.apply({"params": params}, padded,
                     mask=jnp.broadcast_to(mask, padded.shape))
  np.testing.assert_allclose(b[:, 2:], a, atol=1e-5)


def test_prefill_then_single_steps_match_the_full_forward(lm):
  model, params = lm
  prefix = jnp.asarray(np.random.default_rng(3).normal(size=(B, 3, 64)),
                       jnp.float32)
  tokens = _tokens(3)
  full, _ = model.apply({"params": params}, tokens, prefix=prefix)
  cache = decoder.init_cache(model, B, 3 + L)
  assert cache["layers"][0]["k"].shape == (B, 3 + L, 1, 32)
  logits, _, cache = model.apply({"params": params}, tokens[:, :2],
                                 prefix=prefix, cache=cache)
  steps = [logits]
  step = jax.jit(lambda c, x: model.apply({"params": params}, x, cache=c))
  for t in range(2, L):
    logits, taps, cache = step(cache, tokens[:, t:t + 1])
    steps.append(logits)
  assert int(cache["index"]) == 3 + L and bool(cache["mask"].all())
  assert taps["hidden"].shape == (B, 1, 64)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4)


def _generate(lm, prompt, **kw):
  model, params = lm
  kw = {"max_new_tokens": NEW, "return_logits": True, **kw}
  return decoder.generate(model, params, prompt, **kw)


@pytest.fixture(scope="module")
def padded_prompt():
  """Two prompts of 4 and 2 tokens, left-padded to 4, after a prefix."""
  prompt = _tokens(4, (B, 4)).at[1, :2].set(0)
  mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
  prefix = jnp.asarray(np.random.default_rng(4).normal(size=(B, 3, 64)),
                       jnp.float32)
  return prompt, mask, prefix


def test_cached_generation_equals_recomputing_everything(lm, padded_prompt):
  prompt, mask, prefix = padded_prompt
  for kw in (dict(), dict(mask=mask, prefix=prefix)):
    cached = _generate(lm, prompt, **kw)
    ref = _generate(lm, prompt, use_cache=False, **kw)
    np.testing.assert_array_equal(cached["tokens"], ref["tokens"])
    np.testing.assert_allclose(cached["logits"], ref["logits"], atol=1e-4)
    assert cached["tokens"].shape == (B, NEW)
    np.testing.assert_array_equal(cached["tokens"],
                                  cached["logits"].argmax(-1))
  # A prompt given as embeddings is the same prompt.
  model, params = lm
  embedded = model.apply({"params": params}, prompt,
                         method=decoder.Decoder.embed)
  again = _generate(lm, embedded, mask=mask, prefix=prefix)
  np.testing.assert_array_equal(again["tokens"], cached["tokens"])


def test_eos_stops_each_sequence_and_pads_after(lm, padded_prompt):
  prompt, mask, _ = padded_prompt
  free = np.asarray(_generate(lm, prompt, mask=mask)["tokens"])
  eos = int(free[0, 1])  # row 0 stops at step 1 (or earlier).
  pad = VOCAB - 1
  out = _generate(lm, prompt, mask=mask, eos_id=eos, pad_id=pad)
  tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  for row in range(B):
    hits = np.flatnonzero(free[row] == eos)
    stop = hits[0] + 1 if hits.size else NEW
    assert lengths[row] == stop
    np.testing.assert_array_equal(tokens[row, :stop], free[row, :stop])
    assert (tokens[row, stop:] == pad).all()
  assert lengths[0] <= 2


def test_temperature_sampling_is_deterministic_given_rng(lm, padded_prompt):
  prompt, mask, _ = padded_prompt
  sample = lambda seed, t=5.0: np.asarray(_generate(
      lm, prompt, mask=mask, temperature=t,
      rng=jax.random.PRNGKey(seed))["tokens"])
  np.testing.assert_array_equal(sample(0), sample(0))
  assert (sample(0) != sample(1)).any()
  greedy = np.asarray(_generate(lm, prompt, mask=mask)["tokens"])
  np.testing.assert_array_equal(sample(1, 0.0), greedy)


def test_remat_and_bfloat16_cache():
  tokens = _tokens()
  model = decoder.Decoder(**KW, remat=True, dtype=jnp.bfloat16)
  params = _init(model, tokens)
  grads = jax.jit(jax.grad(
      lambda p: model.apply({"params": p}, tokens)[0].mean()))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  cache = decoder.init_cache(model, B, 8)
  assert cache["layers"][1]["v"].dtype == jnp.bfloat16
  out = decoder.generate(model, params, tokens, max_new_tokens=2)
  assert out["tokens"].shape == (B, 2) and out["tokens"].dtype == jnp.int32
