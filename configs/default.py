r"""EVL-ECG runs: teacher training, student distillation and evaluation.

  python -m evl_ecg_jax.main --config=configs/default.py:mode=train_teacher \
      --workdir=workdir/teacher
  python -m evl_ecg_jax.main --config=configs/default.py:mode=distill,loss=kd \
      --config.teacher.init=workdir/teacher --workdir=workdir/student_kd

Variants (`arg`, comma separated): mode=train_teacher|distill|evaluate,
size=tiny|small|base|large|2b|7b (both models; teacher_size= / student_size=
set one), teacher=vit1d and model=cnn1d|xresnet1d|convnext1d|vit1d (the
model families), teacher_leads= / student_leads=all|limb|precordial|I+II|I
(leads each model reads; e.g. a lead-I wearable student of a 12-lead
teacher), loss=ce|kd|fitnet|rkd|dkd|tinybert|uld|crd|dist (baselines)|
evl (redesigned)|evl_paper (the paper's formulation)|evl_no_mhca|evl_no_rel|evl_no_ot|
evl_shuffled (EVL fed another record's teacher: the control),
data=synthetic|synthetic500|synthetic_tiny|ptbxl|ptbxl500,
folds=standard|shared (PTB-XL: train 1-8/val 9/test 10, or 1-7/8/9 for the
shared subset), parallel=pmap|spmd|shard_map (data-parallel pmap, jit on a
sharded data x fsdp x tensor mesh (docs/scale.md), or pmap's step under
jit + shard_map on a data-only mesh), runlocal (a few steps on tiny
data, for smoke tests).

Real data is read from the official layout, never copied: e.g.
  --config=configs/default.py:data=ptbxl,folds=shared \
      --config.data.manual_dir=../shared/data/ptbxl
Every field the code reads is set here; override with --config.x.y=value.
"""

import os

import ml_collections

from evl_ecg_jax import config as config_lib
from evl_ecg_jax.losses import terms as terms_lib
from evl_ecg_jax.models import presets

# Model sizes: evl_ecg_jax/models/presets.py (tiny|small|base|large for every
# family, 2b|7b for vit1d). Tokens per 10-s ECG: the teacher ~256 (the
# paper's visual tokens), the student ~64.
_TOKENS = {"teacher": 256, "student": 64}
# Param f32 / compute dtype per preset; the frozen teacher's params are cast
# to bfloat16 from "base" up.
_BF16_TEACHER = ("base", "large", "2b", "7b")
_DATA = {  # variant -> (TFDS name, sampling rate)
    "synthetic": ("synthetic_ecg/100hz", 100),
    "synthetic500": ("synthetic_ecg/500hz", 500),
    "synthetic_tiny": ("synthetic_ecg/tiny", 100),
    "ptbxl": ("ptbxl/100hz_superdiagnostic", 100),
    "ptbxl500": ("ptbxl/500hz_superdiagnostic", 500),
}
_SYNTHETIC_SPLITS = dict(train="train", validation="validation", test="test")
# PTB-XL strat_folds -> splits: the benchmark's 1-8 / 9 / 10 (Strodthoff et
# al. 2021), or 1-7 / 8 / 9 for the shared subset, which has no fold 10.
_FOLDS = {
    "standard": dict(train="+".join(f"fold{k}" for k in range(1, 9)),
                     validation="fold9", test="fold10"),
    "shared": dict(train="+".join(f"fold{k}" for k in range(1, 8)),
                   validation="fold8", test="fold9"),
}
# loss variant -> the settings it gives the terms (dotted fields of
# config.loss, over the parts' defaults in evl_ecg_jax/losses/terms.py) and
# the optim fields it departs on; `ce` has α = 0 (no teacher). Baselines:
# weight 1 with each method's own internal weights. benchmarks/kd_table.py
# re-chooses every λ on validation (per term for EVL); docs/evl.md has the
# measurements behind every departure of `evl` from `evl_paper`.
_EVL_PAPER = {"terms.mhca.weight": 0.01, "terms.relation.weight": 0.01,
              "terms.ot.weight": 0.01}  # one λ, tied (the paper's sum)
_EVL = {
    # λ per term as benchmarks/kd_table.py chose them on validation for the
    # published table (docs/results.md, "λ").
    "terms.kd.weight": 1.0, "terms.mhca.weight": 0.01,
    "terms.relation.weight": 1.0, "terms.ot.weight": 0.3,
    "terms.mhca.time_sigma": 0.02,  # MHCA keeps the tokens' order
    # Relations across the batch's records, with RKD's potentials.
    "terms.relation.batch_share": 1.0, "terms.relation.batch_form": "angle",
    # Temporal, debiased OT at a relative ε, a looser and faster solve.
    "terms.ot.plan_gradient": "stop", "terms.ot.time_weight": 1.0,
    "terms.ot.relative_epsilon": True, "terms.ot.debiased": True,
    "terms.ot.teacher_self_term": False, "terms.ot.threshold": 1e-2,
    "terms.ot.max_iterations": 100, "terms.ot.inner_iterations": 5,
    "terms.ot.momentum": 1.5,
    "optim.heads_grad_clip_norm": 1.0,  # the heads on their own clip
}
_LOSS_VARIANTS = {
    "ce": {},
    "kd": {"terms.kd.weight": 1.0},
    "fitnet": {"terms.fitnet.weight": 1.0},
    "rkd": {"terms.rkd.weight": 1.0},
    "dkd": {"terms.dkd.weight": 1.0},
    "tinybert": {"terms.kd.weight": 1.0, "terms.tinybert.weight": 1.0},
    # T of the signal table's ULD runs (KD's; the part's default is ULD's).
    "uld": {"terms.uld.weight": 1.0, "terms.uld.temperature": 2.0},
    "crd": {"terms.crd.weight": 1.0},
    "dist": {"terms.dist.weight": 1.0},
    "evl_paper": _EVL_PAPER,
    "evl": _EVL,
    "evl_no_mhca": dict(_EVL, **{"terms.mhca.weight": 0.0}),
    "evl_no_rel": dict(_EVL, **{"terms.relation.weight": 0.0}),
    "evl_no_ot": dict(_EVL, **{"terms.ot.weight": 0.0}),
    # The control: EVL fed the teacher outputs of another record.
    "evl_shuffled": dict(_EVL, shuffle_teacher=True),
}
# Steps per mode for the default (CPU-demo) sizes.
_STEPS = {"train_teacher": 400, "distill": 300, "evaluate": 1}


def _layer_taps(block):
  """Taps at about 1/3, 2/3 and the end of a model (TinyBERT's layer map)."""
  if block.name == "vit1d":
    return tuple(f"block{max(0, block.depth * k // 3 - 1)}" for k in (1, 2)
                 ) + ("tokens",)
  return ("stage1", "stage2", "tokens")  # conv families: 4 stages.


def _loss_config(loss, student, teacher):
  """(config.loss, {optim field: value}) of variant `loss`."""
  # L = (1 − α)·L_CE + α·Σ_k λ_k·L_k (EVL-ECG Eq. 9): one section per term
  # k of evl_ecg_jax/losses/terms.py (its fields and what each does), λ_k =
  # terms.<k>.weight, 0 = off. Override as --config.loss.terms.ot.epsilon=…
  if loss not in _LOSS_VARIANTS:
    raise config_lib.ConfigError(
        f"Config variant loss={loss!r}: expected one of "
        f"{sorted(_LOSS_VARIANTS)}.")
  config = ml_collections.ConfigDict(dict(
      alpha=0.0 if loss == "ce" else 0.5,  # α: weight of distillation.
      # The control: the teacher outputs of another record (a roll of the
      # global batch). Must erase EVL's gain if the gain is transfer.
      shuffle_teacher=False,
      # The feature tap each kind of term reads (models.tap_names lists a
      # model's): hidden states (MHCA, relation, FitNet), visual tokens
      # (OT), one embedding per record (batch relations, RKD, CRD).
      taps=dict(student_hidden="tokens", teacher_hidden="tokens",
                student_ot="tokens", teacher_ot="tokens",
                student_embed="pooled", teacher_embed="pooled"),
      terms=terms_lib.defaults(),
  ))
  # TinyBERT's (student, teacher) layer pairs: 1/3, 2/3 and the end.
  config.terms.tinybert.layer_map = tuple(zip(_layer_taps(student),
                                              _layer_taps(teacher)))
  variant = dict(_LOSS_VARIANTS[loss])
  optim = {k[len("optim."):]: variant.pop(k) for k in list(variant)
           if k.startswith("optim.")}
  return config_lib.override(config, variant), optim


def _data_config(arg, synthetic):
  """config.data for the `data` / `folds` / `runlocal` variants."""
  tfds_name, rate = _DATA["synthetic_tiny" if arg.runlocal and synthetic
                           else arg.data]
  return dict(
      tfds_name=tfds_name,
      data_dir="",  # "" -> TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
      # Real data: the downloaded dataset in its official layout (TFDS
      # manual_dir), e.g. ../shared/data/ptbxl or $PTBXL_DIR.
      manual_dir="" if synthetic else os.environ.get("PTBXL_DIR", ""),
      class_names=("NORM", "MI", "STTC", "CD", "HYP"),  # C = 5 superclasses.
      sampling_rate=rate,  # Hz of the stored records.
      # Preprocessing (train and eval) and seeded training augmentations;
      # all off by default (evl_ecg_jax.data.transforms).
      transforms=dict(
          bandpass_hz=(),  # e.g. (0.5, 40.0): zero-phase Butterworth.
          standardize=False,  # per-lead z-score over time.
          resample_hz=0,  # 0: keep sampling_rate; else the models' rate.
          scale=0.0,  # amplitude x U(1 - scale, 1 + scale).
          baseline_wander=0.0,  # drift amplitude per lead (signal units).
          noise_std=0.0,  # Gaussian noise σ.
          lead_dropout=0.0,  # probability of zeroing each lead.
      ),
      # Logical split -> TFDS split (PTB-XL: sums of strat_folds).
      splits=_SYNTHETIC_SPLITS if synthetic else _FOLDS[arg.folds],
      batch_size=8 if arg.runlocal else 32,  # global, split over all devices.
      eval_batch_size=16 if arg.runlocal else 256,
      shuffle_seed=0,
      # Labels kept for this fraction of the training records (stratified
      # by label set, seeded by label_seed); the task loss ignores the
      # others, distillation uses every record (the labels protocol).
      label_fraction=1.0,
      label_seed=0,
      prefetch_threads=2,
      worker_processes=0,  # >0: grain worker processes (mp_prefetch).
      # Decode the training split once and keep it in memory (same batches;
      # for many short runs on a small dataset, e.g. benchmarks/kd_table.py).
      in_memory=False,
  )


def _model_configs(arg, rate):
  """(config.teacher, config.student) for the model variants."""
  samples = 10 * rate  # 10-s records.

  def model_block(role, family, size, leads):
    try:
      fields = presets.model_config(family, size, samples=samples,
                                    tokens=_TOKENS[role])
    except ValueError as e:
      raise config_lib.ConfigError(f"Config variant for the {role}: {e}")
    # Dropout 0.1, but none for the tiny teacher (it underfits with it).
    dropout = 0.0 if role == "teacher" and size == "tiny" else 0.1
    return dict(fields, leads=leads, dropout=dropout)

  teacher_size = arg.teacher_size or arg.size
  teacher = dict(
      init="",  # workdir of the train_teacher run; read in distill mode.
      # Dtype of the frozen teacher's params in distillation (cast on load).
      frozen_param_dtype=("bfloat16" if teacher_size in _BF16_TEACHER
                          else "float32"),
      # Distillation reads the teacher's outputs from a store written once
      # under teacher.init/teacher_store (train/teacher_store.py) instead of
      # running it every step; refused with augmentations on.
      cache_features=False,
      # A foreign teacher instead of teacher.init: an .onnx file and its
      # JSON spec (input rate, samples, leads, units; outputs; class map;
      # docs/teachers.md). Its outputs always come from the store.
      onnx="",
      onnx_spec="",
      # The store's logits and features: float32, or float16 (half the
      # size; docs/teachers.md bounds the change of the KD loss).
      store_dtype="float32",
      store_dir="",  # "": teacher.init/ (or the .onnx's folder/) teacher_store
      **model_block("teacher", arg.teacher, teacher_size, arg.teacher_leads))
  student = model_block("student", arg.model, arg.student_size or arg.size,
                        arg.student_leads)
  return teacher, student


def _optim_config():
  """config.optim: AdamW on a warmup + cosine schedule."""
  return dict(
      learning_rate=1e-3,  # peak, after linear warmup; cosine decay to 0.
      warmup_steps=40,
      weight_decay=1e-4,  # AdamW, on kernels only.
      b1=0.9,
      b2=0.999,
      grad_clip_norm=1.0,
      # The distillation heads (params["heads"]) on their own clip and
      # learning-rate scale; 0: one global clip over student and heads.
      # (In the paper's EVL the aligner's guard gradient, 1.3, exceeded the
      # global clip and rescaled the student's task step.)
      heads_grad_clip_norm=0.0,
      heads_learning_rate_scale=1.0,
  )


def get_config(arg=None):
  """Returns the run config for the variants in `arg`."""
  arg = config_lib.parse_arg(arg, mode="distill", size="tiny",
                             teacher_size="", student_size="",
                             teacher="vit1d", model="cnn1d",
                             teacher_leads="all", student_leads="all",
                             loss="kd", data="synthetic", folds="standard",
                             parallel="pmap", runlocal=False)
  for variant, known in (("data", _DATA), ("folds", _FOLDS)):
    if arg[variant] not in known:
      raise config_lib.ConfigError(
          f"Config variant {variant}={arg[variant]!r}: expected one of "
          f"{sorted(known)}.")
  synthetic = arg.data.startswith("synthetic")
  config = ml_collections.ConfigDict()
  config.mode = arg.mode
  config.seed = 0
  config.data = _data_config(arg, synthetic)
  config.teacher, config.student = _model_configs(
      arg, config.data.sampling_rate)

  # Logical axis -> mesh axis (models/layers.py names the axes); used when
  # params and activations are sharded over a `data x fsdp x tensor` mesh.
  # A mesh axis of size -1 takes the remaining devices.
  # pmap: the step per device, state replicated (data parallel). spmd: the
  # same step under jit on the mesh below, params / optimizer state / the
  # frozen teacher sharded by the rules (FSDP, tensor parallel). shard_map:
  # pmap's step (named-axis collectives) under jit on the mesh below, which
  # must then be data-only (train/runner.py).
  config.parallel = arg.parallel
  # Micro-batches per step (gradients averaged in f32): data.batch_size is
  # the global batch of one update.
  config.grad_accum_steps = 1
  # What a term that compares or normalises across records means under
  # grad_accum_steps > 1 (batch relations and RKD, the shuffled-teacher
  # roll, ULD's and the label- or token-masked task means): 'refuse'
  # (config.check stops such a run, naming the fields) or 'micro_batch'
  # (each is taken over a micro-batch's B / k records, gathered over every
  # device and host, and the micro-batches' values are averaged: another
  # objective than the whole batch's, which an exact version would need a
  # second student forward to give; docs/scale.md).
  config.grad_accum_batch_terms = "refuse"
  # XLA's optimization level for the train step ('' = XLA's default; 'O0'..
  # 'O3'), under spmd and shard_map (jax.pmap takes no compiler options).
  # On TPU the default spends most of a compile searching tilings for each
  # matmul: 'O1' compiled the 7B -> 2B EVL step 5x faster on a 2-core host
  # (docs/scale.md) at a runtime cost not measured here (no TPU): for quick
  # iterations and AOT fit checks of such runs, not a tuned default.
  config.xla_optimization_level = ""
  config.sharding = dict(
      mesh_axes=("data", "fsdp", "tensor"),
      mesh_shape=(-1, 1, 1),
      rules=(("batch", ("data", "fsdp")), ("length", None),
             ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("kv", None), ("channels_in", "fsdp"), ("channels", "tensor"),
             ("conv_window", None), ("classes", None), ("norm", None),
             ("vocab", "tensor"), ("kv_heads", "tensor")),  # (VLM decoder)
  )

  config.loss, optim_variant = _loss_config(arg.loss, config.student,
                                            config.teacher)
  config.optim = _optim_config()
  config.optim.update(optim_variant)
  config.total_steps = 4 if arg.runlocal else _STEPS[arg.mode]
  if arg.runlocal:
    config.optim.warmup_steps = 1
  config.log_every_steps = 2 if arg.runlocal else 50
  config.eval_every_steps = 4 if arg.runlocal else 200
  config.ckpt_every_steps = 2 if arg.runlocal else 200
  # Orbax keeps the last max_to_keep steps plus the one with the best
  # best_metric (a metric of eval.splits[0], computed at eval steps and the
  # last step; "" keeps the last steps only).
  config.ckpt = dict(max_to_keep=2, best_metric="validation/macro_auc",
                     best_mode="max")
  # Consecutive steps with a non-finite loss or gradients (each skipped,
  # params unchanged) after which the run stops with an error.
  config.max_bad_steps = 10
  config.eval = dict(
      model="teacher" if arg.mode == "train_teacher" else "student",
      splits=("validation", "test"),
      checkpoint="latest",  # mode=evaluate reads the "latest" or "best" step.
      # Distillation diagnostics at every validation step (diag/* in
      # metrics.jsonl, summarised in metrics.json; train/diagnostics.py).
      diagnostics=True,
  )
  return config
