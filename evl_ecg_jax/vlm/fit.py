"""fit(config, workdir) for the VLM configs (configs/vlm.py).

The same runner, train step, objective, checkpoints and guards as the
signal models (train/loop.py, train/trainer.py); what differs is the batch
(vlm/data.py), the task of the step (vlm/task.py), the tokenizers and the
evaluation (vlm/evaluate.py). mode=pipeline trains the teacher in
<workdir>/teacher, then distils the student in <workdir>/student.
"""

from __future__ import annotations

import os

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from evl_ecg_jax import checkpoint
from evl_ecg_jax import config as config_lib
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.models import vlm as vlm_lib
from evl_ecg_jax.train import build
from evl_ecg_jax.train import loop
from evl_ecg_jax.train import trainer
from evl_ecg_jax.vlm import data as data_lib
from evl_ecg_jax.vlm import evaluate as evaluate_lib
from evl_ecg_jax.vlm import render as render_lib
from evl_ecg_jax.vlm import task as task_lib
from evl_ecg_jax.vlm import text as text_lib
from evl_ecg_jax.vlm import tokenizer as tokenizer_lib
from evl_ecg_jax.vlm import vision

# Terms the VLM objective supports: logit KD, DKD and DIST need one
# vocabulary or class logits, RKD and CRD pooled embeddings (not tried on a
# VLM); ULD is the cross-vocabulary logit term.
SUPPORTED_TERMS = ("mhca", "relation", "ot", "uld", "fitnet")


def build_model(block: ml_collections.ConfigDict, vocab_size: int, *,
                field: str, image_size) -> vlm_lib.ECGVLM:
  """The VLM of a config block; checks its visual tokens against patching."""
  try:
    model = vlm_lib.build(block.preset, vocab_size, **dict(block.overrides))
  except (ValueError, TypeError) as e:
    raise config_lib.ConfigError(f"config.{field}.preset={block.preset!r}: "
                                 f"{e}") from None
  step = model.patch_size * model.pool
  config_lib.require(
      all(s % step == 0 for s in image_size), "vlm.image_size",
      tuple(image_size), f"sides divisible by the {field}'s patch x pool "
      f"= {step}")
  tokens = vlm_lib.visual_tokens(model, image_size)
  config_lib.require(tokens == block.visual_tokens, f"{field}.visual_tokens",
                     block.visual_tokens, f"{tokens}, the tokens of a "
                     f"{tuple(image_size)} image at patch {model.patch_size}"
                     f" x pool {model.pool}")
  return model


def render_spec(config) -> render_lib.RenderSpec:
  """The printout look of `config.vlm.render` (ConfigError on a bad field)."""
  try:
    return render_lib.RenderSpec(**dict(config.vlm.render))
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f"config.vlm.render: {e}") from None


def check(config) -> None:
  """VLM-specific config checks (config_lib.check does the shared ones)."""
  for name, settings in config.loss.terms.items():
    config_lib.require(name in SUPPORTED_TERMS or settings.weight == 0,
                       f"loss.terms.{name}.weight", settings.weight,
                       f"0 for a VLM (supported terms: {SUPPORTED_TERMS})")
  config_lib.require(config.vlm.max_len > 0, "vlm.max_len",
                     config.vlm.max_len, "a positive number of tokens")
  unknown = sorted(set(config.vlm.kinds) - set(text_lib.KINDS))
  config_lib.require(not unknown, "vlm.kinds", tuple(config.vlm.kinds),
                     f"kinds among {text_lib.KINDS}")
  render_spec(config)


def tokenizers(config, workdir: str, descriptions) -> dict:
  """{"teacher", "student"} tokenizers, saved in <workdir>/tokenizers.

  Trained on the corpus of the class descriptions; a distilled student
  loads the teacher's tokenizer from the teacher's workdir (its embedding
  was trained on those ids).
  """
  corpus = list(text_lib.corpus(config.data.class_names, descriptions))
  out = {}
  for name in task_lib.TOKENIZERS:
    saved = os.path.join(workdir, "tokenizers", f"{name}.json")
    teacher_dir = config.teacher.init
    if name == "teacher" and config.mode == "distill" and teacher_dir:
      saved = os.path.join(teacher_dir, "tokenizers", "teacher.json")
    if os.path.exists(saved):
      out[name] = tokenizer_lib.Tokenizer.load(saved)
    else:
      block = config[name]
      out[name] = tokenizer_lib.Tokenizer.train(corpus, block.tokenizer,
                                                block.vocab_size)
    if jax.process_index() == 0:
      path = epath.Path(workdir) / "tokenizers" / f"{name}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      out[name].save(str(path))
  return out


def _images_and_labels(batcher: data_lib.Batcher, data_cfg, split: str,
                       limit: int = 0):
  """Rendered images [N, H, W, 1] (the batcher's recipe, in chunks of
  eval_batch_size) and labels [N, C] of the first `limit` records of a
  split (0: all)."""
  records = pipeline.split_records(data_cfg, split, limit)
  ecg, size = records["ecg"], data_cfg.eval_batch_size
  images = np.concatenate([batcher.images(ecg[i:i + size])
                           for i in range(0, len(ecg), size)])
  return images, records["labels"]


def qa_triples(labels, class_names, descriptions, seed) -> list:
  """One seeded verify or choose question per record: (index, q, answer)."""
  rng = np.random.default_rng([seed, 1])
  out = []
  for i, row in enumerate(labels):
    (question, answer, _), = text_lib.qa_pairs(
        row, class_names, descriptions, rng, 1, ("verify", "choose"))
    out.append((i, question, answer))
  return out


def _evaluate(config, batcher, model, params, tokenizer, descriptions,
              splits) -> dict:
  """Every metric (generation, soft P(yes), QA) on each of `splits`."""
  out = {}
  names = tuple(config.data.class_names)
  for split in splits:
    images, labels = _images_and_labels(batcher, config.data, split)
    metrics = evaluate_lib.evaluate(
        model, params, images, labels, tokenizer, names, descriptions,
        qa=qa_triples(labels, names, descriptions, config.seed),
        max_new_tokens=config.vlm.max_new_tokens,
        batch_size=config.vlm.eval_batch_size)
    out.update({f"{split}/{k}": v for k, v in metrics.items()})
  return out


def _validator(config, batcher, model, tokenizer, descriptions):
  """params -> soft P(yes) metrics on the first `config.vlm.
  validation_records` of eval.splits[0], rendered once per run."""
  split = config.eval.splits[0]
  images, labels = _images_and_labels(batcher, config.data, split,
                                      config.vlm.validation_records)
  names = tuple(config.data.class_names)

  def validate(params):
    scores = evaluate_lib.soft_scores(
        model, params["model"], images, tokenizer, names, descriptions,
        batch_size=config.vlm.eval_batch_size)
    return {f"{split}/{k}": v for k, v in
            evaluate_lib.soft_metrics(scores, labels, names).items()}
  return validate


def fit(config, workdir: str) -> dict:
  """Runs `config.mode` (see module docstring); returns the final metrics."""
  if config.mode == "pipeline":
    workdir = build.resolve_workdir(workdir)
    teacher_cfg, student_cfg = stages(config, workdir)
    fit(teacher_cfg, os.path.join(workdir, "teacher"))
    return fit(student_cfg, os.path.join(workdir, "student"))
  check(config)
  run, workdir = build.prepare(config, workdir, model_names=())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  descriptions = _descriptions(config)
  toks = tokenizers(config, workdir, descriptions)
  trained = build.trained_block(config)
  size = tuple(config.vlm.image_size)
  model = build_model(config[trained], toks[trained].vocab_size,
                      field=trained, image_size=size)
  teacher = (build_model(config.teacher, toks["teacher"].vocab_size,
                         field="teacher", image_size=size)
             if build.uses_teacher(config) else None)
  batcher = data_lib.Batcher(
      tokenizers=toks, class_names=tuple(config.data.class_names),
      descriptions=descriptions, sampling_rate=config.data.sampling_rate,
      image_size=size, max_len=config.vlm.max_len,
      spec=render_spec(config), kinds=tuple(config.vlm.kinds),
      seed=config.seed)
  first = pipeline.example(config.data)
  example = _model_batch(batcher(
      {k: np.asarray(v)[None] for k, v in first.items()}, 0))
  validate = _validator(config, batcher, model, toks[trained], descriptions)
  spec = loop.RunSpec(
      model=model, teacher=teacher, objective=build.objective(config),
      task=task_lib.VLMTask(trained=trained), model_name=config[trained].preset,
      shown=tuple(f"{split}/soft/macro_auc" for split in config.eval.splits),
      load=lambda: {"model": checkpoint.load_params(
          workdir, config.eval.checkpoint)["model"]},
      train=lambda monitor: _train(config, workdir, run, spec, batcher,
                                   example, validate, monitor),
      evaluate=lambda params: _evaluate(
          config, batcher, model, params["model"], toks[trained],
          descriptions, config.eval.splits))
  return loop.run_mode(config, workdir, run, spec)


def _descriptions(config):
  """Class descriptions of the report texts: PTB-XL's statements, or the
  built-in ones."""
  if config.data.tfds_name.startswith("ptbxl") and config.data.manual_dir:
    return text_lib.ptbxl_descriptions(config.data.manual_dir,
                                       config.data.class_names)
  return text_lib.describe_classes(config.data.class_names)


def _model_batch(batch):
  """The arrays the step reads (ids and labels stay on the host)."""
  return {k: jnp.asarray(v) for k, v in batch.items()
          if k not in ("id", "labels")}


def _train(config, workdir, run, spec, batcher, example, validate, monitor):
  """Trains `spec.model` (a ViT pre-trained on the labels first, when the
  config asks); returns params {"model": ...}."""
  init, step_fn, teacher_abstract = build.step_parts(
      config, spec.model, spec.teacher, spec.objective, example, spec.task)
  teacher_params = None
  if spec.teacher is not None:
    teacher_params = build.load_teacher_params(config, run, teacher_abstract)
  batches = data_lib.VLMBatches(pipeline.train_iterator(
      config.data, process_index=jax.process_index(),
      process_count=jax.process_count()), batcher)
  steps = config.vlm.vision_pretrain_steps
  if steps and not checkpoint.has_checkpoint(workdir):
    # Every process reads the same global batches: the same ViT everywhere.
    images = ({"image": batcher.images(b["ecg"]), "labels": b["labels"]}
              for b in pipeline.train_iterator(config.data))
    vit, _ = vision.pretrain(
        spec.model, images, steps=steps, seed=config.seed,
        num_classes=len(config.data.class_names),
        learning_rate=config.optim.learning_rate)
    init = vision.with_vision(init, vit)
  return {"model": trainer.train(config, workdir, run, trainer.TrainSpec(
      init=init, step_fn=step_fn, batches=batches, validate=validate,
      host_keys=("id", "labels"), teacher_params=teacher_params,
      teacher_abstract=teacher_abstract, diagnose=monitor))["model"]}


def stages(config, workdir: str):
  """(teacher config, student config) of mode=pipeline."""
  teacher_cfg = ml_collections.ConfigDict(config.to_dict())
  teacher_cfg.mode = "train_teacher"
  teacher_cfg.eval.model = "teacher"
  student_cfg = ml_collections.ConfigDict(config.to_dict())
  student_cfg.mode = "distill"
  student_cfg.teacher.init = os.path.join(workdir, "teacher")
  return teacher_cfg, student_cfg
