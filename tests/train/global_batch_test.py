"""One objective on any number of devices: the loss variants users run.

Every term that compares or normalises across records (EVL's and RKD's
batch relations, the shuffled-teacher control's roll, the labels
protocol's masked BCE, the VLM's answer-token CE) means the global batch
(docs/scale.md, "One objective on any number of devices"). Each case runs
the step on one device and under pmap, spmd (a 4 x 2 x 1 mesh) and
shard_map on 8 fake devices at 1 and 2 examples per device: step-1 terms
agree to 1e-4 relative and params after 3 SGD steps to 1e-5.

The teacher's outputs are cached in the batch, as train/teacher_store.py
does, so that each program compiles the student's step alone.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from configs import vlm as vlm_config
from evl_ecg_jax import cost
from evl_ecg_jax import config as config_lib
from evl_ecg_jax import models
from evl_ecg_jax import parallel
from evl_ecg_jax.models import vlm as vlm_lib
from evl_ecg_jax.train import build
from evl_ecg_jax.train import runner as runner_lib
from evl_ecg_jax.train import step as step_lib
from evl_ecg_jax.vlm import data as vlm_data
from evl_ecg_jax.vlm import task as vlm_task
from evl_ecg_jax.vlm import text as text_lib
from evl_ecg_jax.vlm import tokenizer as tokenizer_lib
from evl_ecg_jax.data import synthetic

STEPS = 3
SGD = optax.sgd(0.1)  # see parallel_modes_test.py: Adam amplifies rounding
MODES = ("pmap", "spmd", "shard_map")
# One record in four labelled (data.label_fraction=0.25): at one record per
# device six of the eight devices hold no label.
LABELLED = np.array([True, False, False, False])


def _runner(mode):
  rules = default.get_config("size=tiny").sharding.rules
  if mode == "one":
    return runner_lib.Spmd(parallel.make_mesh(
        ("data", "fsdp", "tensor"), (1, 1, 1), devices=jax.devices()[:1]),
                           rules)
  if mode == "pmap":
    return runner_lib.Pmap()
  shape, make = {"spmd": ((4, 2, 1), runner_lib.Spmd),
                 "shard_map": ((8, 1, 1), runner_lib.ShardMap)}[mode]
  return make(parallel.make_mesh(("data", "fsdp", "tensor"), shape), rules)


def _with_teacher_outputs(teacher, batch, objective, task):
  """`batch` plus the teacher's cached outputs (one program, one device)."""
  args, kwargs = task.inputs(batch, "teacher")
  params = jax.jit(lambda *a: teacher.init(jax.random.PRNGKey(1), *a,
                                           **kwargs))(*args)["params"]
  taps = objective.model_taps("teacher")
  logits, hidden = jax.jit(functools.partial(
      step_lib.teacher_outputs, teacher, taps=taps, task=task))(params, batch)
  return {**batch, "teacher/logits": logits,
          **{f"teacher/{t}": hidden[t] for t in taps}}


def _fit(mode, case, accum=1, steps=STEPS):
  """(params after `steps` SGD steps, metrics of each step) of `mode` on
  `case` = (student, teacher, objective, batch, task); the teacher only
  shapes the heads, its outputs are in the batch."""
  student, teacher, objective, batch, task = case
  runner = _runner(mode)
  init = build.state_initializer(student, SGD, None,
                                {k: v[:1] for k, v in batch.items()},
                                objective, teacher, task)
  state = runner.init_state(init, jax.random.PRNGKey(0))
  step = runner.train_step(functools.partial(
      step_lib.train_step, model=student, teacher=None, objective=objective,
      tx=SGD, task=task, accum_steps=accum), state)
  history = []
  for _ in range(steps):
    state, metrics = step(state, None, runner.put_batch(batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


def _assert_same(a, b):
  (params_a, hist_a), (params_b, hist_b) = a, b
  for k in hist_a[0]:
    np.testing.assert_allclose(hist_b[0][k], hist_a[0][k], rtol=1e-4,
                               atol=1e-7, err_msg=f"step-1 {k}")
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0,
                                 atol=1e-5), params_b, params_a)


def _signal(loss, n, label_fraction=False, **terms):
  """The `_fit` case of the signal path on n records (`terms`: loss fields
  set on top of the variant)."""
  config = default.get_config(f"size=tiny,teacher=vit1d,model=cnn1d,"
                              f"loss={loss}")
  config.student.dropout = 0.0  # per-device masks would differ, by design
  config.teacher.depth = 1
  config_lib.override(config.loss, terms)
  student = models.get(config.student, 5)
  teacher = models.get(config.teacher, 5)
  objective = build.objective(config)
  rng = np.random.default_rng(0)
  batch = {"ecg": jnp.asarray(rng.normal(size=(n, 1000, 12)), jnp.float32),
           "labels": jnp.asarray(rng.random((n, 5)) < 0.3, jnp.float32)}
  if label_fraction:
    batch["label_mask"] = jnp.asarray(np.resize(LABELLED, n))
  task = step_lib.SignalTask
  return (student, teacher, objective,
          _with_teacher_outputs(teacher, batch, objective, task), task)


@pytest.mark.parametrize("per_device", [1, 2])
def test_every_signal_cross_record_term_is_the_global_batch_s(per_device):
  # One program switches on every cross-record term of the signal path
  # (compiling one per variant would cost the suite minutes): the shipped
  # control `evl_shuffled` (EVL's batch relations, MHCA, OT and KD on the
  # teacher outputs rolled over the global batch), the batch baselines RKD,
  # CRD (in-batch negatives) and DIST (correlations across the batch), and
  # the labels protocol's masked task loss (data.label_fraction=0.25).
  run = _signal("evl_shuffled", 8 * per_device, label_fraction=True,
                **{f"terms.{t}.weight": 1.0 for t in ("rkd", "crd", "dist")})
  one = _fit("one", run)
  assert all(one[1][0][t] > 1e-3 for t in
             ("relation", "mhca", "ot", "kd", "rkd", "crd", "dist", "ce")
             ), one[1][0]
  for mode in MODES:
    _assert_same(one, _fit(mode, run))


def test_shipped_evl_is_the_global_batch_s():
  # `loss=evl` as users run it, at 1 record per device (before the gather,
  # pmap's relation term was 0 here).
  run = _signal("evl", 8)
  one = _fit("one", run)
  assert one[1][0]["relation"] > 1e-3
  _assert_same(one, _fit("pmap", run))


def test_accumulation_takes_each_micro_batch_s_relations():
  # config.grad_accum_batch_terms='micro_batch': the batch terms are each
  # global micro-batch's (rows i, i + k, ...). One SGD step of accum=2 moves
  # the params by the mean of the two micro-batches' steps; pmap at 2
  # records per device (1 per micro-batch) takes the same micro-batches.
  run = _signal("evl", 16)
  student, teacher, objective, batch, task = run
  whole = _fit("one", run, accum=2, steps=1)
  micro = [_fit("one", (student, teacher, objective,
                        {k: v[i::2] for k, v in batch.items()}, task),
                steps=1) for i in range(2)]
  for k in ("relation", "kd", "loss"):
    np.testing.assert_allclose(
        whole[1][0][k], np.mean([m[1][0][k] for m in micro]), rtol=1e-4,
        err_msg=k)
  jax.tree.map(lambda w, a, b: np.testing.assert_allclose(
      w, (a + b) / 2, rtol=0, atol=1e-6), whole[0], micro[0][0], micro[1][0])
  _assert_same(whole, _fit("pmap", run, accum=2, steps=1))


NAMES = ("NORM", "MI", "STTC", "CD", "HYP")


@pytest.fixture(scope="module")
def vlm_pair():
  corpus = list(text_lib.corpus(NAMES, text_lib.describe_classes(NAMES)))
  toks = {"teacher": tokenizer_lib.Tokenizer.train(corpus, "bpe", 512),
          "student": tokenizer_lib.Tokenizer.train(corpus, "unigram", 384)}
  batcher = vlm_data.Batcher(
      tokenizers=toks, class_names=NAMES,
      descriptions=text_lib.describe_classes(NAMES), sampling_rate=100,
      image_size=(64, 64), max_len=40)
  ecg, labels = synthetic.generate(0, 16)
  batch = batcher({"ecg": ecg, "labels": labels, "id": np.arange(16)}, 0)
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
  student = vlm_lib.build("tiny_student", toks["student"].vocab_size)
  # The task loss alone: its answer-token mean is the VLM's own
  # cross-record term (the distillation terms' batch relations are the
  # signal path's code, tested above).
  objective = build.objective(vlm_config.get_config("loss=ce"))
  return student, None, objective, batch, vlm_task.VLMTask()


@pytest.mark.parametrize("per_device", [1, 2])
def test_vlm_answer_token_ce_is_the_global_batch_s(vlm_pair, per_device):
  student, teacher, objective, batch, task = vlm_pair
  batch = {k: v[:8 * per_device] for k, v in batch.items()}
  answers = np.asarray(batch["answer_student"]).sum(1)
  assert len(set(answers)) > 1  # answers of different lengths
  run = (student, teacher, objective, batch, task)
  one = _fit("one", run)
  assert one[1][0]["ce"] > 1e-3
  for mode in MODES:
    _assert_same(one, _fit(mode, run))


@pytest.mark.parametrize("loss", ["rkd", "evl_shuffled", "kd"])
def test_bytes_the_cross_record_terms_move(loss):
  # What the AOT report counts (docs/scale.md): the objective's collectives
  # per device on 16 data shards (4 records each), from its jaxpr on an
  # abstract mesh. The relations gather the pooled student and teacher rows
  # of the global batch (B x width x 4 bytes each) and hand each device its
  # own rows' gradient back (a reduce-scatter of b x student width); the
  # control's roll by one record sends one row of each teacher output; KD
  # moves scalars only.
  config = default.get_config(f"mode=distill,loss={loss},size=tiny")
  objective = build.objective(config)
  example = jnp.zeros((1, 1000, 12))
  student, teacher = build.build_models(config, objective, example.shape)
  shapes = cost.loss_shapes(config, 64, student, teacher, objective, example)
  moved = cost.cross_record_bytes(objective, shapes, 16)
  if loss == "kd":
    assert set(moved) == {"psum"} and moved["psum"] <= 16, moved
    return
  pooled = [[x.shape[-1] for x in jax.tree.leaves(out[1]) if x.ndim == 2]
            for out in shapes[1:3]]
  assert [len(p) for p in pooled] == [1, 1], pooled
  (s_width,), (t_width,) = pooled
  assert moved["all_gather"] == 64 * (s_width + t_width) * 4, moved
  assert moved["reduce_scatter"] == 4 * s_width * 4, moved
  if loss == "evl_shuffled":
    row = sum(x.size // 64 * 4 for x in jax.tree.leaves(shapes[2]))
    assert moved["ppermute"] == row, (moved, row)
  else:
    assert "ppermute" not in moved
