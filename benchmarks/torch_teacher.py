r"""A teacher from another framework: a CODE-like 12-lead 1-D ResNet written
in PyTorch (Ribeiro et al. 2020: 400 Hz, 4096 samples, leads first),
trained briefly on the training split, exported with torch.onnx, with the
spec that tells evl-ecg-jax what it reads and returns (docs/teachers.md).

  pip install -e '.[export,torch-reference]'
  python benchmarks/torch_teacher.py --out=workdir/torch_teacher \
      --config=configs/default.py:data=ptbxl,folds=shared \
      --config.data.manual_dir=../shared/data/ptbxl \
      --config.data.data_dir=workdir/tfds_ptbxl

writes <out>/teacher.onnx (outputs "logits" [B, 5] and "embedding"
[B, 128]), <out>/teacher_spec.json and <out>/teacher.json (epochs, the
validation macro-AUC of the epoch kept, seconds). The model reads what the
spec declares, made from the stored 100 Hz records by the same
preprocessing (teachers/spec.adapt): resampled to 400 Hz, zero-padded from
4000 to 4096 samples, leads first. The epoch is chosen on validation.
"""

from __future__ import annotations

import json
import os
import time
import warnings

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import torch
from torch import nn

from evl_ecg_jax import console
from evl_ecg_jax.data import pipeline
from evl_ecg_jax.eval import metrics as metrics_lib
from evl_ecg_jax.models import layers
from evl_ecg_jax.teachers import spec as spec_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py:data=ptbxl,folds=shared",
    "Config whose config.data the teacher trains on.", lock_config=True)
_OUT = flags.DEFINE_string("out", "workdir/torch_teacher", "Output folder.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Training epochs.")
_WIDTH = flags.DEFINE_integer("width", 32, "Channels of the first block.")
_SEED = flags.DEFINE_integer("seed", 0, "torch seed.")

SPEC = {"input": {"name": "ecg", "layout": "batch,leads,samples",
                  "sampling_rate_hz": 400, "samples": 4096,
                  "leads": list(layers.LEADS), "units": "mV"},
        "outputs": {"logits": {"kind": "logits", "activation": "sigmoid"},
                    "embedding": {"kind": "features", "tap": "pooled"}}}


class Block(nn.Module):
  """Residual block of the CODE ResNet: two k=17 convolutions, the second
  strided by `down`; the skip max-pooled and 1x1-projected."""

  def __init__(self, cin, cout, down):
    super().__init__()
    self.conv1 = nn.Conv1d(cin, cout, 17, padding=8, bias=False)
    self.bn1 = nn.BatchNorm1d(cout)
    self.conv2 = nn.Conv1d(cout, cout, 17, stride=down, padding=8,
                           bias=False)
    self.bn2 = nn.BatchNorm1d(cout)
    self.skip = nn.Sequential(nn.MaxPool1d(down), nn.Conv1d(cin, cout, 1))
    self.drop = nn.Dropout(0.2)

  def forward(self, x):
    y = self.drop(torch.relu(self.bn1(self.conv1(x))))
    return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNet1d(nn.Module):
  """[B, 12, 4096] -> (logits [B, C], embedding [B, 4·width])."""

  def __init__(self, num_classes, width):
    super().__init__()
    widths = [width, 2 * width, 3 * width, 4 * width]
    self.stem = nn.Sequential(nn.Conv1d(12, width, 17, padding=8, bias=False),
                              nn.BatchNorm1d(width), nn.ReLU())
    self.blocks = nn.Sequential(*[
        Block(cin, cout, 4) for cin, cout in zip([width] + widths, widths)])
    self.head = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    embedding = self.blocks(self.stem(x)).mean(dim=-1)
    return self.head(embedding), embedding


def _inputs(data_cfg, split, spec):
  records = pipeline.split_records(data_cfg, split, raw=True)
  x = np.stack([spec_lib.adapt(r, data_cfg.sampling_rate, spec)
                for r in records["ecg"]])
  return torch.from_numpy(x), records["labels"].astype(np.float32)


def _auc(model, x, labels, class_names):
  model.eval()
  with torch.no_grad():
    logits = torch.cat([model(x[i:i + 128])[0] for i in range(0, len(x), 128)])
  return metrics_lib.multilabel_auc(labels, torch.sigmoid(logits).numpy(),
                                    class_names)["macro_auc"]


def train(data_cfg, spec, epochs, width, seed):
  """The model of the epoch with the best validation macro-AUC, and the
  history."""
  torch.manual_seed(seed)
  torch.set_num_threads(os.cpu_count() or 1)
  x, y = _inputs(data_cfg, "train", spec)
  vx, vy = _inputs(data_cfg, "validation", spec)
  model = ResNet1d(y.shape[1], width)
  opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
  sched = torch.optim.lr_scheduler.OneCycleLR(
      opt, max_lr=2e-3, total_steps=epochs * (-(-len(x) // 32)))
  y = torch.from_numpy(y)
  best, history, state = -1.0, [], None
  for epoch in range(epochs):
    model.train()
    order = torch.randperm(len(x))
    for i in range(0, len(x), 32):
      idx = order[i:i + 32]
      loss = nn.functional.binary_cross_entropy_with_logits(
          model(x[idx])[0], y[idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
      sched.step()
    auc = _auc(model, vx, vy, data_cfg.class_names)
    history.append(round(float(auc), 4))
    print(f"epoch {epoch + 1}/{epochs}: validation macro-AUC {auc:.4f}",
          flush=True)
    if auc > best:
      best = auc
      state = {k: v.clone() for k, v in model.state_dict().items()}
  model.load_state_dict(state)
  return model.eval(), best, history


def export(model, path, spec):
  """torch.onnx's TorchScript exporter (dynamo=False: the torch.export one
  needs onnxscript, which nothing else here uses), dynamic batch."""
  dummy = torch.zeros(1, 12, spec["input"]["samples"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(model, (dummy,), path, input_names=["ecg"],
                      output_names=["logits", "embedding"], opset_version=17,
                      dynamic_axes={n: {0: "batch"} for n in
                                    ("ecg", "logits", "embedding")},
                      dynamo=False)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  console.quiet(_OUT.value)  # library logs (the TFDS build) to log.txt
  data_cfg = _CONFIG.value.data
  raw = dict(SPEC, classes=list(data_cfg.class_names))
  spec_path = os.path.join(_OUT.value, "teacher_spec.json")
  with open(spec_path, "w", encoding="utf-8") as f:
    json.dump(raw, f, indent=1)
  spec = spec_lib.load(spec_path, data_cfg.class_names)
  start = time.perf_counter()
  model, best, history = train(data_cfg, spec, _EPOCHS.value, _WIDTH.value,
                               _SEED.value)
  export(model, os.path.join(_OUT.value, "teacher.onnx"), SPEC)
  summary = dict(model="ResNet1d (CODE-like)", width=_WIDTH.value,
                 epochs=_EPOCHS.value, validation_macro_auc=round(best, 4),
                 history=history,
                 seconds=round(time.perf_counter() - start, 1),
                 torch=torch.__version__)
  with open(os.path.join(_OUT.value, "teacher.json"), "w",
            encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
