"""Distillation diagnostics: references for each measure, and controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evl_ecg_jax import losses
from evl_ecg_jax import models
from evl_ecg_jax.train import diagnostics as diag_lib
from evl_ecg_jax.train import step as step_lib

B, T, C = 8, 96, 3


def _cka_np(x, y):
  """Kornblith et al. (2019), Eq. 3 with linear kernels: HSIC via H K H."""
  x, y = np.float64(x), np.float64(y)
  n = len(x)
  h = np.eye(n) - 1.0 / n
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def test_linear_cka_matches_the_hsic_formula_and_its_invariances():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 7))
  assert float(diag_lib.linear_cka(x, y)) == pytest.approx(_cka_np(x, y),
                                                          rel=1e-4)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  assert float(diag_lib.linear_cka(x, 3.0 * x @ q + 1.0)) == pytest.approx(
      1.0, rel=1e-5)
  assert float(diag_lib.linear_cka(x, x[::-1])) < 0.5
  assert float(diag_lib.linear_cka(x, np.ones_like(y))) == 0.0


def _setup(loss_kwargs, same_records=False):
  model = models.CNN1D(num_classes=C, widths=(8, 16), dropout=0.0)
  teacher = models.CNN1D(num_classes=C, widths=(8, 24, 24), dropout=0.0)
  rng = np.random.default_rng(1)
  ecg = rng.normal(size=(B, T, 12)).astype(np.float32)
  if same_records:
    ecg[:] = ecg[:1]
  batch = {"ecg": ecg,
           "labels": (rng.random((B, C)) < 0.4).astype(np.float32)}
  objective = losses.build_objective(**loss_kwargs)

  @jax.jit
  def init(x):  # one compile (op by op, the init and taps took 7 s)
    params = {"model": models.init_params(model, jax.random.PRNGKey(0), x)}
    teacher_params = models.init_params(teacher, jax.random.PRNGKey(1), x)
    if objective.heads is not None:
      params["heads"] = objective.init_heads(
          jax.random.PRNGKey(2),
          model.apply({"params": params["model"]}, x,
                      taps=objective.model_taps("student"))[1],
          teacher.apply({"params": teacher_params}, x,
                        taps=objective.model_taps("teacher"))[1])
    return params, teacher_params

  params, teacher_params = init(jnp.asarray(ecg[:1]))
  return model, teacher, objective, params, teacher_params, batch


EVL = dict(alpha=0.5, terms=dict(
    kd=dict(weight=0.3), mhca=dict(weight=0.7, time_sigma=0.05),
    relation=dict(weight=0.4, batch_share=0.5),
    ot=dict(weight=0.2, plan_gradient="stop", debiased=True, time_weight=1.0,
            relative_epsilon=True, epsilon=0.5)))


def _diagnose(setup):
  model, teacher, objective, params, teacher_params, batch = setup
  return jax.jit(lambda p, tp, b: diag_lib.diagnostics(
      p, tp, b, model=model, teacher=teacher, objective=objective))(
          params, teacher_params, batch)


@pytest.fixture(scope="module")
def evl_run():
  """One compile of the diagnostics, shared by the tests that read them."""
  setup = _setup(EVL)
  return setup, _diagnose(setup)


def test_gradient_shares_and_cosines_match_direct_gradients(evl_run):
  setup, out = evl_run
  model, teacher, objective, params, teacher_params, batch = setup
  t_out = step_lib.teacher_outputs(teacher, teacher_params, batch,
                                   objective.model_taps("teacher"))

  names = ("ce", "kd", "mhca", "relation", "ot")

  @jax.jit
  def term_grads(p):
    def f(p, name):
      s_out = model.apply({"params": p}, batch["ecg"],
                          taps=objective.model_taps("student"))
      return objective(params["heads"], s_out, t_out, batch["labels"])[1][
          name]
    out = {}
    for name in names:
      g = jax.grad(f)(p, name)
      g.pop("ClassifierHead_0")  # the encoder only
      out[name] = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])
    return out

  grads = jax.device_get(term_grads(params["model"]))
  task = grads["ce"]
  for name in names[1:]:
    g = grads[name]
    share = (0.5 * objective.weights[name] * np.linalg.norm(g)
             / (0.5 * np.linalg.norm(task)))
    cos = np.vdot(g, task) / (np.linalg.norm(g) * np.linalg.norm(task))
    assert float(out[f"grad_share/{name}"]) == pytest.approx(share, rel=1e-3)
    assert float(out[f"grad_cos/{name}"]) == pytest.approx(cos, abs=1e-3)
  # The aligner's guard never reaches the student.
  assert float(out["grad_share/mhca_reconstruction"]) == 0.0


def test_teacher_dependence_is_nil_when_every_record_is_the_same():
  """Control: shuffling identical records changes nothing (per-record
  terms; relations across identical records are degenerate)."""
  terms = dict(EVL["terms"], relation=dict(weight=0.4, batch_share=0.0))
  out = _diagnose(_setup(dict(EVL, terms=terms), same_records=True))
  for name in ("kd", "mhca", "relation", "ot"):
    assert float(out[f"teacher_grad_cos/{name}"]) == pytest.approx(
        1.0, abs=1e-4)
    assert abs(float(out[f"teacher_value_gap/{name}"])) < 1e-4


def test_teacher_dependence_is_seen_for_a_student_matching_its_teacher():
  """KD and batch relations against (nearly) the student itself: the
  matched teacher fits best."""
  model, _, objective, params, _, batch = _setup(dict(alpha=0.5, terms=dict(
      kd=dict(weight=1.0), relation=dict(weight=1.0, batch_share=1.0))))
  perturbed = jax.tree.map(lambda x: 1.01 * x, params["model"])
  out = jax.jit(lambda p, tp, b: diag_lib.diagnostics(
      p, tp, b, model=model, teacher=model, objective=objective))(
          params, perturbed, batch)
  for name in ("kd", "relation"):
    assert float(out[f"teacher_value_gap/{name}"]) > 0.5
    assert float(out[f"teacher_grad_cos/{name}"]) < 0.9
  assert float(out["cka/logits"]) > 0.99 > float(out["cka/logits_shuffled"])


def test_mhca_and_ot_structure_measures(evl_run):
  _, out = evl_run
  assert 0.0 < float(out["mhca/attention_entropy"]) < 1.0
  assert -1.0 <= float(out["mhca/aligned_token_cos"]) <= 1.0
  assert 0.0 <= float(out["mhca/aligned_record_share"]) <= 1.0
  m = T // 4  # student tokens
  assert 1.0 <= float(out["ot/plan_perplexity"]) <= m
  # ott-jax checks the error every 10 iterations; EVL here caps at 1000.
  assert 10.0 <= float(out["ot/sinkhorn_iterations"]) <= 1000.0
  # A diagonal plan has its mass on the diagonal and perplexity 1; the
  # independent plan has the uniform mass and perplexity M.
  eye = np.kron(np.eye(m), np.ones((1, 1)))[None] / m
  ident = diag_lib._ot(jnp.asarray(eye))  # pylint: disable=protected-access
  assert float(ident["ot/plan_perplexity"]) == pytest.approx(1.0)
  assert float(ident["ot/diagonal_mass"]) == pytest.approx(1.0)
  flat = diag_lib._ot(jnp.full((1, m, m), 1.0 / m**2))  # pylint: disable=protected-access
  assert float(flat["ot/plan_perplexity"]) == pytest.approx(m, rel=1e-4)
  assert float(flat["ot/diagonal_mass"]) == pytest.approx(
      float(flat["ot/diagonal_mass_uniform"]), rel=1e-5)
  one = jnp.ones((1, 5, 4)) * jnp.arange(1.0, 5.0)
  assert float(diag_lib._mhca(dict(  # pylint: disable=protected-access
      aligned=one, attention=jnp.full((1, 2, 5, 7), 1 / 7)))[
          "mhca/aligned_token_cos"]) == pytest.approx(1.0, abs=1e-5)
