r"""Entry point: python -m evl_ecg_jax.main --config=configs/X.py:arg --workdir=DIR.

The mode (train_teacher | distill | evaluate) is `config.mode`; any field can
be overridden with --config.<field>=<value>.
"""

from __future__ import annotations

import functools
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from evl_ecg_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/default.py:mode=distill.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (outputs).")
_PREPARE_ONLY = flags.DEFINE_bool(
    "prepare_only", False,
    "Check the config and prepare every dataset split it reads (a TFDS "
    "build on first use), then exit without training. Run it once before "
    "starting several runs at a time on a fresh data_dir, so that they do "
    "not build the same dataset concurrently.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing that turns config-override errors into one message.

  An override of a key that is not in the config (`--config.typo=1`) raises
  deep inside ml_collections; report it with the flag and the config file.
  """
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip("\"'")
    bad = [a for a in argv[1:] if a.startswith("--config.") and key in a]
    sys.exit(f"Unknown config field {key!r} in {' '.join(bad)}: no such key "
             "in the config file. Check the spelling against the config "
             "file (every field is set there).")


def _prepare(config, workdir, model_names):
  """--prepare_only: the config checked, its splits prepared."""
  from evl_ecg_jax import console  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import build  # pylint: disable=g-import-not-at-top
  kwargs = {} if model_names is None else {"model_names": model_names}
  build.prepare(config, workdir, **kwargs)
  splits = sorted({"train", *config.eval.splits})
  console.show(f"{config.data.tfds_name} {splits}: ready in "
               f"{config.data.data_dir or '~/tensorflow_datasets'}")


def main(argv):
  del argv
  from evl_ecg_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet(_WORKDIR.value)
  distributed.initialize()
  from evl_ecg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import guards  # pylint: disable=g-import-not-at-top
  from evl_ecg_jax.train import loop  # pylint: disable=g-import-not-at-top
  vlm = _CONFIG.value.get("model_kind") == "vlm"
  fit = loop.fit
  if vlm:
    from evl_ecg_jax.vlm import fit as vlm_fit  # pylint: disable=g-import-not-at-top
    fit = vlm_fit.fit
  if _PREPARE_ONLY.value:
    fit = functools.partial(_prepare, model_names=() if vlm else None)
  try:
    fit(_CONFIG.value, _WORKDIR.value)
  except guards.Preempted as e:
    logging.warning("Preempted after step %s; checkpoint saved.", e)
    sys.exit(0)
  except config_lib.ConfigError as e:  # on stderr, before anything is written
    sys.exit(f"Config error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
