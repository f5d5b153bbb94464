"""MHCA aligner and loss: shapes, masks, reference values and anti-collapse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evl_ecg_jax import losses

B, N, M, DT, DS = 3, 10, 4, 12, 8


def _hidden(seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, M, DS)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, N, DT)), jnp.float32))


def _standardize_np(x):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)


def _mhca_np(s, t, mask=None):
  """mean_b mean_{valid i} mean_c (std(s)_ic − std(t)_ic)², by loops."""
  s, t = _standardize_np(np.float64(s)), _standardize_np(np.float64(t))
  mask = np.ones(s.shape[:2], bool) if mask is None else mask
  return np.mean([np.mean([np.mean((s[b, i] - t[b, i]) ** 2)
                           for i in np.flatnonzero(mask[b])])
                  for b in range(s.shape[0])])


def test_aligner_shapes_and_dtypes():
  h_s, h_t = _hidden(0)
  aligner = losses.MHCAAligner(num_heads=2, qkv_features=16)
  params = aligner.init(jax.random.PRNGKey(0), h_s, h_t)
  aligned, rec = aligner.apply(params, h_s, h_t)
  assert aligned.shape == (B, M, DS) and rec.shape == (B, N, DT)
  names = set(params["params"])
  assert names == {"align", "decode", "decoder_queries"}
  aligned16, _ = losses.MHCAAligner(2, 16, dtype=jnp.bfloat16).apply(
      params, h_s.astype(jnp.bfloat16), h_t.astype(jnp.bfloat16))
  assert aligned16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(aligned16), aligned, atol=0.1)
  no_rec = losses.MHCAAligner(2, reconstruct=False)
  out, none = no_rec.apply(no_rec.init(jax.random.PRNGKey(0), h_s, h_t),
                           h_s, h_t)
  assert none is None and out.shape == (B, M, DS)


def test_key_mask_hides_teacher_tokens():
  h_s, h_t = _hidden(1)
  aligner = losses.MHCAAligner(num_heads=2, reconstruct=False)
  params = aligner.init(jax.random.PRNGKey(0), h_s, h_t)
  mask = np.ones((B, N), bool)
  mask[:, 6:] = False
  garbage = h_t.at[:, 6:].set(1e3)
  aligned, _ = aligner.apply(params, h_s, h_t, teacher_mask=mask)
  aligned_garbage, _ = aligner.apply(params, h_s, garbage, teacher_mask=mask)
  dropped, _ = aligner.apply(params, h_s, h_t[:, :6])
  np.testing.assert_allclose(aligned_garbage, aligned, atol=1e-5)
  np.testing.assert_allclose(dropped, aligned, atol=1e-5)


def test_queries_carry_no_gradient_to_the_student():
  h_s, h_t = _hidden(2)
  for stop, expect_zero in ((True, True), (False, False)):
    aligner = losses.MHCAAligner(num_heads=2, stop_query_gradient=stop)
    params = aligner.init(jax.random.PRNGKey(0), h_s, h_t)
    g = jax.grad(lambda s: jnp.sum(aligner.apply(params, s, h_t)[0] ** 2))(
        h_s)
    assert (float(jnp.max(jnp.abs(g))) == 0.0) == expect_zero


def test_mhca_loss_matches_reference_and_properties():
  h_s, h_t = _hidden(3)
  other = jnp.asarray(np.random.default_rng(9).normal(size=(B, M, DS)),
                      jnp.float32)
  assert float(losses.mhca_loss(h_s, other)) == pytest.approx(
      _mhca_np(h_s, other), rel=1e-5)
  mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  assert float(losses.mhca_loss(h_s, other, mask=mask)) == pytest.approx(
      _mhca_np(h_s, other, mask), rel=1e-5)
  # Normalised: 0 for the same states up to per-token scale and offset,
  # 4 for anti-correlated tokens; not normalised: the plain MSE.
  assert float(losses.mhca_loss(h_s, 3.0 * h_s + 1.0)) == pytest.approx(
      0.0, abs=1e-5)
  assert float(losses.mhca_loss(h_s, -h_s)) == pytest.approx(4.0, rel=1e-5)
  assert float(losses.mhca_loss(h_s, other, normalize=False)) == pytest.approx(
      np.mean((np.float64(h_s) - np.float64(other)) ** 2), rel=1e-5)
  with pytest.raises(ValueError, match="same shape"):
    losses.mhca_loss(h_s, other[:, :3])


def test_reconstruction_loss_targets_standardised_teacher():
  _, h_t = _hidden(4)
  target = _standardize_np(np.float64(h_t))
  assert float(losses.mhca_reconstruction_loss(
      h_t, jnp.asarray(target, jnp.float32))) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.mhca_reconstruction_loss(h_t, jnp.zeros_like(h_t))) == (
      pytest.approx(1.0, rel=1e-4))


def test_bf16_large_and_one_token_inputs_stay_finite():
  h_s, h_t = _hidden(5)
  aligner = losses.MHCAAligner(num_heads=2)
  params = aligner.init(jax.random.PRNGKey(0), h_s, h_t)
  one = np.zeros((B, N), bool)
  one[:, 0] = True
  one_s = np.zeros((B, M), bool)
  one_s[:, 0] = True

  def total(s, t, mask_t, mask_s):
    aligned, rec = aligner.apply(params, s, t, teacher_mask=mask_t,
                                 student_mask=mask_s)
    return (losses.mhca_loss(s, jax.lax.stop_gradient(aligned), mask=mask_s)
            + losses.mhca_reconstruction_loss(t, rec, mask=mask_t))

  for s, t, mask_t, mask_s in ((h_s.astype(jnp.bfloat16),
                                h_t.astype(jnp.bfloat16), None, None),
                               (1e3 * h_s, 1e3 * h_t, None, None),
                               (h_s, h_t, one, one_s)):
    value, grads = jax.value_and_grad(total, argnums=(0, 1))(s, t, mask_t,
                                                             mask_s)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.float32(g))) for g in grads)


def _attention(aligner, params, h_s, h_t, **kw):
  """The aligner's attention weights [B, H, M, N] (sown intermediates)."""
  _, inter = aligner.apply(params, h_s, h_t, mutable=["intermediates"], **kw)
  return np.asarray(inter["intermediates"]["align"]["attention_weights"][0])


def _positions_np(n):
  return (np.arange(n) + 0.5) / n


def test_temporal_prior_is_a_gaussian_log_bias_on_the_logits():
  h_s, h_t = _hidden(6)
  plain = losses.MHCAAligner(num_heads=2, reconstruct=False)
  params = plain.init(jax.random.PRNGKey(0), h_s, h_t)
  sigma = 0.15
  timed = losses.MHCAAligner(num_heads=2, reconstruct=False, time_sigma=sigma)
  w_plain = _attention(plain, params, h_s, h_t)
  w_timed = _attention(timed, params, h_s, h_t)
  # softmax(l + b) = softmax(l) ∘ exp(b), renormalised.
  prior = np.exp(-(_positions_np(M)[:, None] - _positions_np(N)[None]) ** 2
                 / (2 * sigma**2))
  expected = w_plain * prior
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(w_timed, expected, rtol=1e-4, atol=1e-6)
  # A narrow prior puts each student position on the teacher tokens that
  # cover the same time; σ → ∞ is the paper's content-only attention.
  narrow = _attention(losses.MHCAAligner(2, reconstruct=False,
                                         time_sigma=0.02), params, h_s, h_t)
  nearest = np.abs(_positions_np(M)[:, None] - _positions_np(N)[None]) < 0.13
  assert (narrow * nearest).sum(-1).min() > 0.99
  wide = _attention(losses.MHCAAligner(2, reconstruct=False, time_sigma=1e4),
                    params, h_s, h_t)
  np.testing.assert_allclose(wide, w_plain, atol=1e-5)


def test_temporal_prior_uses_positions_among_valid_tokens():
  h_s, h_t = _hidden(7)
  aligner = losses.MHCAAligner(num_heads=2, reconstruct=False, time_sigma=0.1)
  params = aligner.init(jax.random.PRNGKey(0), h_s, h_t)
  mask = np.ones((B, N), bool)
  mask[:, 7:] = False
  aligned, _ = aligner.apply(params, h_s, h_t, teacher_mask=mask)
  dropped, _ = aligner.apply(params, h_s, h_t[:, :7])
  np.testing.assert_allclose(aligned, dropped, atol=1e-5)


def test_temperature_scales_the_logits():
  h_s, h_t = _hidden(8)
  base = losses.MHCAAligner(num_heads=2, reconstruct=False)
  params = base.init(jax.random.PRNGKey(0), h_s, h_t)
  hot = _attention(losses.MHCAAligner(2, reconstruct=False, temperature=0.5),
                   params, h_s, h_t)
  ref = _attention(base, params, h_s, h_t)
  sharpened = ref**2 / (ref**2).sum(-1, keepdims=True)  # logits x 2
  np.testing.assert_allclose(hot, sharpened, rtol=1e-4, atol=1e-6)


# --- Anti-collapse --------------------------------------------------------
# A teacher with content only (no positional pattern), and a student MLP whose
# input is either independent noise ("unrelated": it cannot know the teacher's
# tokens) or the teacher's own input averaged to the student's length.
CB, CN, CM, CDT, CDS, CIN = 32, 32, 8, 24, 16, 6


class _Student(nn.Module):

  @nn.compact
  def __call__(self, z):
    return nn.Dense(CDS)(nn.gelu(nn.Dense(64)(z)))


def _collapse_batch(key, related):
  w = jax.random.normal(jax.random.PRNGKey(42), (CIN, CDT)) / np.sqrt(CIN)
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (CB, CN, CIN))
  z = (x.reshape(CB, CM, CN // CM, CIN).mean(2) * 2 if related
       else jax.random.normal(k2, (CB, CM, CIN)))
  return 2 * jnp.tanh(x @ w), z


def _train_mhca(related, guarded, steps=400):
  """Trains student + aligner on the MHCA terms; returns (first, final) L_mhca."""
  objective = losses.build_objective(alpha=1.0, terms=dict(mhca=dict(
      weight=1.0, num_heads=4, qkv_features=32)))
  naive = losses.MHCAAligner(num_heads=4, qkv_features=32, reconstruct=False,
                             stop_query_gradient=False)
  h_t, z = _collapse_batch(jax.random.PRNGKey(0), related)
  student = _Student()
  params = {"s": student.init(jax.random.PRNGKey(1), z)["params"]}
  h_s = student.apply({"params": params["s"]}, z)
  if guarded:
    params["h"] = objective.init_heads(jax.random.PRNGKey(2),
                                       {"tokens": h_s}, {"tokens": h_t})
  else:
    params["h"] = naive.init(jax.random.PRNGKey(2), h_s, h_t)["params"]

  def loss_fn(params, key):
    h_t, z = _collapse_batch(key, related)
    h_s = student.apply({"params": params["s"]}, z)
    if guarded:  # the library objective: L_mhca + reconstruction guard
      terms = objective.distill_terms(params["h"], (None, {"tokens": h_s}),
                                      (None, {"tokens": h_t}))
      return terms["mhca"] + terms["mhca_reconstruction"], terms["mhca"]
    aligned, _ = naive.apply({"params": params["h"]}, h_s, h_t)
    value = losses.mhca_loss(h_s, aligned)  # aligner trained on L_mhca
    return value, value

  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, key):
    (_, mhca), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, mhca

  opt_state = tx.init(params)
  first = None
  for i in range(steps):
    params, opt_state, mhca = step(params, opt_state, jax.random.PRNGKey(i))
    first = float(mhca) if first is None else first
  final = np.mean([float(loss_fn(params, jax.random.PRNGKey(10**6 + j))[1])
                   for j in range(4)])
  return first, final


@pytest.mark.slow  # trains a student against the guard
def test_unrelated_student_cannot_collapse_the_guarded_mhca_loss():
  first, unrelated = _train_mhca(related=False, guarded=True)
  _, related = _train_mhca(related=True, guarded=True)
  # Uncorrelated standardised tokens give 2; the guard keeps it there.
  assert unrelated > 0.8 * first and unrelated > 1.5
  # Positive control: a student that sees the teacher's input does learn.
  assert related < unrelated - 0.1
  # Negative control: an aligner trained on L_mhca itself, queries not
  # stopped, drives the loss to ~0 for the same unrelated student.
  _, naive = _train_mhca(related=False, guarded=False)
  assert naive < 0.1 * first

