"""The EVL objective: Eq. 9 combination, ablations, heads and gradient routes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from evl_ecg_jax import losses

B, N, M, DT, DS, C = 4, 12, 5, 10, 6, 3
EVL = dict(mhca=dict(weight=0.7, num_heads=2), relation=dict(weight=0.4),
           ot=dict(weight=0.3, epsilon=0.2, threshold=1e-6))


def _objective(alpha, *, shuffle_teacher=False, taps=(), **terms):
  return losses.build_objective(alpha=alpha, terms=terms, taps=taps,
                                shuffle_teacher=shuffle_teacher)


def _outs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  student = (arr(B, C), {"tokens": arr(B, M, DS), "pooled": arr(B, DS)})
  teacher = (arr(B, C), {"tokens": arr(B, N, DT), "pooled": arr(B, DT)})
  labels = jnp.asarray(rng.random((B, C)) < 0.4, jnp.float32)
  return student, teacher, labels


def _token_masks(seed, teacher_keep=0.7):
  """Random valid-token masks of the hidden taps (first token always
  valid): student [B, M] keeps ~70 %, teacher [B, N] ~`teacher_keep`."""
  rng = np.random.default_rng(seed)
  return {"student_hidden": jnp.asarray(rng.random((B, M)) < 0.7).at[
              :, 0].set(True),
          "teacher_hidden": jnp.asarray(rng.random((B, N)) < teacher_keep).at[
              :, 0].set(True)}


def _init(objective, student, teacher):
  return objective.init_heads(jax.random.PRNGKey(0), student[1], teacher[1])


def test_evl_loss_is_equation_9():
  terms = {"mhca": 1.5, "relation": 0.25, "ot": 2.0}
  weights = {"mhca": 0.7, "relation": 0.4, "ot": 0.3}
  total = losses.evl_loss(0.8, terms, alpha=0.3, weights=weights)
  assert float(total) == pytest.approx(
      0.7 * 0.8 + 0.3 * (0.7 * 1.5 + 0.4 * 0.25 + 0.3 * 2.0))


def test_objective_matches_the_terms_computed_by_hand():
  student, teacher, labels = _outs()
  alpha, gamma = 0.4, 0.5
  objective = _objective(alpha, kd=dict(weight=0.2, temperature=2.0), **dict(
      EVL, mhca=dict(EVL["mhca"], reconstruction_weight=gamma)))
  params = _init(objective, student, teacher)
  total, terms = objective(params, student, teacher, labels)
  assert set(terms) == {"ce", "kd", "mhca", "mhca_reconstruction", "relation",
                        "ot"}
  head = objective.heads.apply({"params": params}, student[1], teacher[1])
  h_s, h_t = student[1]["tokens"], teacher[1]["tokens"]
  unit = lambda x: losses.evl.unit_tokens(x)
  by_hand = {
      "ce": losses.sigmoid_bce_loss(student[0], labels),
      "kd": losses.logit_kd_loss(teacher[0], student[0], temperature=2.0),
      "mhca": losses.mhca_loss(h_s, head["aligned"]),
      "mhca_reconstruction": losses.mhca_reconstruction_loss(
          h_t, head["reconstruction"]),
      "relation": losses.relation_loss(head["aligned"], h_s),
      "ot": losses.ot_loss(unit(h_t), unit(head["ot_student"]), epsilon=0.2,
                           solver=losses.ot.Solver.of(1e-6, 1000, 10, 1.0)),
  }
  for name, value in by_hand.items():
    assert float(terms[name]) == pytest.approx(float(value), rel=1e-5), name
  expected = (1 - alpha) * by_hand["ce"] + alpha * (
      0.2 * by_hand["kd"] + 0.7 * by_hand["mhca"] + 0.4 * by_hand["relation"]
      + 0.3 * by_hand["ot"] + gamma * by_hand["mhca_reconstruction"])
  assert float(total) == pytest.approx(float(expected), rel=1e-5)
  # OT tokens are unit vectors, so the OT cost lies in [0, 4].
  assert 0.0 < float(terms["ot"]) < 4.0


@pytest.mark.parametrize("variant,absent,heads", [
    ("ce", {"kd", "mhca", "relation", "ot", "mhca_reconstruction"}, set()),
    ("kd", {"mhca", "relation", "ot", "mhca_reconstruction"}, set()),
    ("evl_paper", {"kd"}, {"aligner", "ot_projection"}),
    ("evl", set(), {"aligner", "ot_projection"}),
    ("evl_shuffled", set(), {"aligner", "ot_projection"}),
    # Relations across the batch read the embeddings: no aligner needed.
    ("evl_no_mhca", {"mhca", "mhca_reconstruction"}, {"ot_projection"}),
    ("evl_no_rel", {"relation"}, {"aligner", "ot_projection"}),
    ("evl_no_ot", {"ot"}, {"aligner"}),
])
def test_config_variants_switch_terms_off(variant, absent, heads):
  loss = default.get_config(f"loss={variant}").loss
  objective = losses.build_objective(alpha=loss.alpha, terms=loss.terms,
                                     shuffle_teacher=loss.shuffle_teacher)
  student, teacher, labels = _outs(1)
  params = None
  if objective.heads is not None:
    params = _init(objective, student, teacher)
  assert set(params or {}) == heads
  _, terms = objective(params, student, teacher, labels)
  everything = {"ce", "kd", "mhca", "relation", "ot", "mhca_reconstruction"}
  assert set(terms) == everything - absent


def test_gradient_routes():
  """Student features learn from every term; the aligner only from its guard."""
  student, teacher, labels = _outs(2)
  objective = _objective(0.5, **EVL)
  params = _init(objective, student, teacher)

  def loss(params, h_s, only=None):
    out = (student[0], {"tokens": h_s})
    total, terms = objective(params, out, teacher, labels)
    return total if only is None else terms[only]

  h_s = student[1]["tokens"]
  g_params, g_hs = jax.grad(loss, argnums=(0, 1))(params, h_s)
  g_rec = jax.grad(loss)(params, h_s, "mhca_reconstruction")
  # Aligner gradient of the total = α·γ·(gradient of the guard alone).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-5,
                                                       atol=1e-7),
               g_params["aligner"], g_rec["aligner"])
  assert float(jnp.max(jnp.abs(g_params["ot_projection"]["kernel"]))) > 0
  for term in ("mhca", "relation", "ot"):
    g_term = jax.grad(lambda h: loss(params, h, term))(h_s)
    assert float(jnp.max(jnp.abs(g_term))) > 0, term
  assert np.all(np.isfinite(g_hs))


def test_teacher_is_never_differentiated():
  student, teacher, labels = _outs(3)
  objective = _objective(0.5, kd=dict(weight=1.0), **EVL)
  params = _init(objective, student, teacher)
  g = jax.grad(lambda t: objective(params, student, t, labels)[0])(teacher)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def test_bf16_features_give_finite_f32_loss_and_gradients():
  student, teacher, labels = _outs(4, jnp.bfloat16)
  objective = _objective(0.5, kd=dict(weight=1.0), **EVL)
  params = _init(objective, student, teacher)
  total, grads = jax.value_and_grad(
      lambda p, s: objective(p, s, teacher, labels)[0], argnums=(0, 1))(
          params, student)
  assert total.dtype == jnp.float32 and np.isfinite(float(total))
  assert all(np.all(np.isfinite(np.float32(g))) for g in jax.tree.leaves(grads))


def _feats_outs(seed=0):
  """Outputs with several taps: tokens, a middle layer, pooled."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  student = (arr(B, C), {"tokens": arr(B, M, DS), "stage1": arr(B, 2 * M, 4),
                         "pooled": arr(B, DS)})
  teacher = (arr(B, C), {"tokens": arr(B, N, DT), "block0": arr(B, N, 7),
                         "pooled": arr(B, DT)})
  labels = jnp.asarray(rng.random((B, C)) < 0.4, jnp.float32)
  return student, teacher, labels


def test_baseline_terms_match_the_loss_functions():
  """Each baseline through the objective = the loss function called by hand
  (teacher tokens average-pooled to the student's length for hints)."""
  student, teacher, labels = _feats_outs()
  mask = jnp.asarray([True, False, True, False])
  objective = _objective(
      0.5, fitnet=dict(weight=1.0), rkd=dict(weight=1.0),
      tinybert=dict(weight=1.0, layer_map=(("stage1", "block0"),
                                           ("tokens", "tokens"))),
      dkd=dict(weight=1.0, temperature=2.0),
      uld=dict(weight=1.0, temperature=2.0))
  assert objective.model_taps("student") == ("tokens", "stage1", "pooled")
  assert objective.model_taps("teacher") == ("tokens", "block0", "pooled")
  params = objective.init_heads(jax.random.PRNGKey(0), student[1], teacher[1])
  assert set(params) == {"fitnet", "tinybert0", "tinybert1"}
  _, terms = objective(params, student, teacher, labels, mask)
  head = objective.heads.apply({"params": params}, student[1], teacher[1])
  (s_logits, s), (t_logits, t) = student, teacher
  pool = losses._ops.pool_tokens  # pylint: disable=protected-access
  # DKD targets: the positive class the teacher scores highest (labelled
  # rows), else the teacher's top class.
  targets = []
  for b in range(B):
    pos = np.flatnonzero(np.asarray(labels[b]))
    if mask[b] and len(pos):
      targets.append(pos[np.argmax(np.asarray(t_logits[b])[pos])])
    else:
      targets.append(int(np.argmax(t_logits[b])))
  by_hand = {
      "ce": losses.sigmoid_bce_loss(s_logits, labels, mask=mask),
      "fitnet": losses.fitnet_loss(pool(t["tokens"], M), head["fitnet"]),
      "tinybert": (losses.fitnet_loss(pool(t["block0"], 2 * M),
                                      head["tinybert0"])
                   + losses.fitnet_loss(pool(t["tokens"], M),
                                        head["tinybert1"])),
      "rkd": losses.rkd_loss(t["pooled"], s["pooled"]),
      "dkd": losses.dkd_loss(t_logits, s_logits, jnp.asarray(targets),
                             temperature=2.0),
      "uld": losses.uld_loss(t_logits, s_logits, temperature=2.0),
  }
  assert set(terms) == set(by_hand)
  for name, value in by_hand.items():
    assert float(terms[name]) == pytest.approx(float(value), rel=1e-5), name
  # The unlabelled rows do not enter the task loss.
  _, flipped = objective(params, student, teacher,
                         labels.at[1].set(1 - labels[1]), mask)
  assert float(flipped["ce"]) == pytest.approx(float(terms["ce"]))


def test_pool_tokens_windows():
  x = jnp.arange(10.0)[None, :, None]
  np.testing.assert_allclose(losses._ops.pool_tokens(x, 10), x)  # pylint: disable=protected-access
  # 10 -> 4: windows [0,3), [2,5), [5,8), [7,10) (adaptive_avg_pool1d).
  np.testing.assert_allclose(
      losses._ops.pool_tokens(x, 4)[0, :, 0], [1.0, 3.0, 6.0, 8.0])  # pylint: disable=protected-access
  const = jnp.full((2, 250, 3), 1.5)
  np.testing.assert_allclose(losses._ops.pool_tokens(const, 63), 1.5,  # pylint: disable=protected-access
                             rtol=1e-6)


@pytest.mark.parametrize("form", ["cosine", "angle"])
def test_batch_relations_of_sequence_taps_average_the_valid_tokens(form):
  """A sequence `embed` tap (a language model's hidden states) enters the
  across-records relation as its mean over the valid positions; "cosine"
  compares the centred means' relations, "angle" is RKD on the means."""
  student, teacher, labels = _outs(3)
  masks = _token_masks(4)
  objective = _objective(
      0.5, relation=dict(weight=1.0, batch_share=1.0, batch_form=form),
      taps=dict(student_embed="tokens", teacher_embed="tokens"))
  del labels
  terms = objective.distill_terms(None, student, teacher, masks=masks)

  def pooled(x, m):
    x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
    mean = (m[..., None] * x).sum(1) / m.sum(1, keepdims=True)
    return jnp.asarray(mean, jnp.float32)

  t, s = (pooled(x[1]["tokens"], masks[f"{role}_hidden"])
          for x, role in ((teacher, "teacher"), (student, "student")))
  if form == "angle":
    want = losses.relation.rkd_loss(t, s)
  else:
    want = losses.relation.relation_loss((t - t.mean(0))[None],
                                         (s - s.mean(0))[None])
  assert float(terms["relation"]) == pytest.approx(float(want), rel=1e-5)
  # Invalid positions do not count: changing them changes nothing.
  noisy = (student[0], {"tokens": jnp.where(
      masks["student_hidden"][..., None], student[1]["tokens"], 1e3)})
  again = objective.distill_terms(None, noisy, teacher, masks=masks)
  assert float(again["relation"]) == pytest.approx(float(want), rel=1e-5)


def test_shuffled_teacher_rolls_outputs_and_teacher_masks_together():
  """The control (teacher_shift=1) equals the matched objective fed another
  record's teacher outputs with that record's token masks; rolling the
  outputs without the masks (the failure this guards) gives another loss."""
  student, teacher, _ = _outs(5)
  masks = _token_masks(6, teacher_keep=0.6)
  matched = _objective(0.5, kd=dict(weight=1.0), **EVL)
  control = _objective(0.5, kd=dict(weight=1.0), shuffle_teacher=True, **EVL)
  assert control.teacher_shift == 1 and matched.teacher_shift == 0
  params = _init(matched, student, teacher)
  roll = lambda x: jnp.roll(x, 1, axis=0)
  other, other_masks = jax.tree.map(roll, teacher), dict(
      masks, teacher_hidden=roll(masks["teacher_hidden"]))
  by_hand = matched.distill_terms(params, student, other, masks=other_masks)
  got = control.distill_terms(params, student, teacher, masks=masks)
  for name, value in by_hand.items():
    assert float(got[name]) == pytest.approx(float(value), rel=1e-5), name
  unrolled_masks = matched.distill_terms(params, student, other, masks=masks)
  assert abs(float(unrolled_masks["mhca"]) - float(got["mhca"])) > 1e-4
  # What the diagnostics inspect is what the control's loss reads.
  plans = control.inspect(params, student, teacher, masks)["ot_plans"]
  want = matched.inspect(params, student, other, other_masks)["ot_plans"]
  np.testing.assert_allclose(plans, want, rtol=1e-5, atol=1e-7)
