r"""EVL-ECG in the paper's setting: ECG vision-language teacher and student.

  python -m evl_ecg_jax.main --config=configs/vlm.py:size=tiny \
      --workdir=workdir/vlm          # teacher, then the distilled student
  python -m evl_ecg_jax.main --config=configs/vlm.py:mode=train_teacher \
      --workdir=workdir/vlm_teacher
  python -m evl_ecg_jax.main --config=configs/vlm.py:mode=distill \
      --config.teacher.init=workdir/vlm_teacher --workdir=workdir/vlm_student

Both models read a rendered 12-lead printout (vlm/render.py) resized to
256 x 256: the teacher's ViT in 16-px patches (256 visual tokens), the
student's in 32-px ones (64), each followed by a decoder LM with its own
tokenizer, trained at build time on our text corpus (teacher byte-level
BPE, student Unigram). Targets are reports and ECG-QA-style questions
built from the labels (vlm/text.py); the loss is on answer tokens only.

Variants: mode=pipeline|train_teacher|distill|evaluate (pipeline: teacher
then student in <workdir>/teacher and <workdir>/student), size=tiny (CPU:
tiny_teacher -> tiny_student) | 2b (paper scale: vlm_7b -> vlm_2b with 2x2
token pooling, for TPU; parameter counts in tests/models/vlm_test.py),
loss=ce|uld|evl|evl_paper|evl_uld|evl_shuffled, data=synthetic|ptbxl, folds=standard|shared,
parallel=pmap|spmd, runlocal (a few steps, for tests).
"""

from configs import default
from evl_ecg_jax import config as config_lib

_SIZES = {  # size -> (teacher preset and overrides, student ...)
    # scan: one nn.scan over each transformer stack (models/layers.py:
    # scanned): one compiled block instead of 24 + 30 (docs/scale.md).
    "tiny": (("tiny_teacher", {"scan": False}),
             ("tiny_student", {"scan": False})),
    "2b": (("vlm_7b", {"scan": True}), ("vlm_2b", {"pool": 2, "scan": True})),
}
# The terms' settings per loss variant (α = 0.5 except ce); docs/vlm.md
# has the validation runs behind each choice. ULD is the cross-vocabulary
# logit baseline (logit KD needs one vocabulary); `evl_paper` the paper's
# terms, λ tied at 0.1; `evl` the signal setting's redesign where it
# applies (batch relations on the LM states averaged over the text tokens,
# MHCA with a prior over the tokens' relative positions, the debiased OT at
# a relative ε; no temporal OT cost: visual tokens are 2-D patches).
_EVL = {
    "terms.mhca.weight": 0.1, "terms.relation.weight": 1.0,
    "terms.ot.weight": 1.0, "terms.mhca.time_sigma": 0.05,
    "terms.relation.batch_share": 1.0, "terms.relation.batch_form": "angle",
    "terms.ot.plan_gradient": "stop", "terms.ot.relative_epsilon": True,
    "terms.ot.debiased": True, "terms.ot.teacher_self_term": False,
    "terms.ot.threshold": 1e-2, "terms.ot.max_iterations": 100,
    "terms.ot.inner_iterations": 5, "terms.ot.momentum": 1.5,
}
_LOSSES = {
    "ce": {},
    "uld": {"terms.uld.weight": 1.0},
    "evl_paper": {"terms.mhca.weight": 0.1, "terms.relation.weight": 0.1,
                  "terms.ot.weight": 0.1},
    "evl": _EVL,
    "evl_uld": dict(_EVL, **{"terms.uld.weight": 1.0}),
    "evl_shuffled": dict(_EVL, shuffle_teacher=True),
}
_MODES = ("pipeline", "train_teacher", "distill", "evaluate")


def get_config(arg=None):
  """Returns the VLM run config for the variants in `arg`."""
  arg = config_lib.parse_arg(arg, mode="pipeline", size="tiny", loss="evl",
                             data="synthetic", folds="standard",
                             parallel="pmap", runlocal=False)
  for variant, known in (("size", _SIZES), ("loss", _LOSSES),
                         ("mode", _MODES)):
    if arg[variant] not in known:
      raise config_lib.ConfigError(
          f"Config variant {variant}={arg[variant]!r}: expected one of "
          f"{sorted(known)}.")
  signal_mode = "distill" if arg.mode == "pipeline" else arg.mode
  config = default.get_config(
      f"mode={signal_mode},data={arg.data},folds={arg.folds},"
      f"parallel={arg.parallel},loss=ce{',runlocal' if arg.runlocal else ''}")
  config.model_kind = "vlm"  # main dispatches on it (evl_ecg_jax/vlm/fit.py)
  config.mode = arg.mode
  (t_preset, t_over), (s_preset, s_over) = _SIZES[arg.size]
  large = arg.size != "tiny"
  config.teacher = dict(
      preset=t_preset, overrides=t_over,
      init="",  # distill/evaluate: the teacher's workdir (pipeline: set).
      frozen_param_dtype="bfloat16" if large else "float32",
      visual_tokens=256,  # checked against the preset's patching
      tokenizer="bpe", vocab_size=512,
      cache_features=False)
  config.student = dict(preset=s_preset, overrides=s_over, visual_tokens=64,
                        tokenizer="unigram", vocab_size=384)
  config.vlm = dict(
      image_size=(256, 256),  # printouts are resized to this
      # vlm/render.py RenderSpec fields of the printout before the resize:
      # 1 px/mm (254 x 164 px, close to the 256 x 256 input) and the 5-mm
      # grid only (the 1-mm grid aliases at this size; see docs/vlm.md).
      render=dict(px_per_mm=1.0, fine_grid=False),
      max_len=64,  # tokens per sequence (bos + prompt + answer + eos)
      kinds=("query", "verify", "choose"),  # question kinds of training
      # Steps of ViT training on the labels before the VLM's (vlm/vision.py;
      # there is no pretrained encoder). 0 for the paper-scale sizes.
      vision_pretrain_steps=0 if large else 600,
      max_new_tokens=40,  # generation in evaluation
      eval_batch_size=64,
      # Records per split in validation during training (0: all). The
      # final evaluation always reads every record.
      validation_records=256,
  )
  # The terms of configs/default.py at their parts' defaults (the paper's
  # values), on the LM hidden states at the text positions (MHCA, relation,
  # batch embeddings averaged over the valid text tokens) and the ViT
  # tokens (OT: 256 teacher vs 64 student visual tokens).
  config.loss.taps = dict(student_hidden="hidden", teacher_hidden="hidden",
                          student_ot="visual", teacher_ot="visual",
                          student_embed="hidden", teacher_embed="hidden")
  config.loss.alpha = 0.0 if arg.loss == "ce" else 0.5
  config_lib.override(config.loss, _LOSSES[arg.loss])
  if arg.loss.startswith("evl") and arg.loss != "evl_paper":
    config.optim.heads_grad_clip_norm = 1.0  # as in configs/default.py
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 1 if arg.runlocal else 50
  steps = {"train_teacher": 1500, "distill": 1500, "pipeline": 1500,
           "evaluate": 1}[arg.mode]
  config.total_steps = 4 if arg.runlocal else steps
  config.log_every_steps = 2 if arg.runlocal else 50
  config.eval_every_steps = 4 if arg.runlocal else 500
  config.ckpt_every_steps = 4 if arg.runlocal else 500
  config.ckpt.best_metric = "validation/soft/macro_auc"
  config.data.batch_size = 8 if arg.runlocal else 32
  config.sharding.mesh_shape = (1, -1, 1) if large else (-1, 1, 1)  # fsdp
  if arg.runlocal:  # (eval batches of one shape: one compile per model)
    config.vlm.update(vision_pretrain_steps=2, validation_records=16,
                      eval_batch_size=16, max_new_tokens=8)
  return config
