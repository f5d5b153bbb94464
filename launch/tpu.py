r"""Runs a config on a Cloud TPU slice: create, set up, run, logs, delete.

  python launch/tpu.py --name=evl-7b2b --zone=us-east5-a \
      --topology=v5e:4x4 --queued --spot \
      --config=configs/scale.py:pair=7b_2b --workdir=gs://BUCKET/evl-7b2b \
      --dry_run all -- --config.total_steps=2000

Actions (positional, any of): create, setup, run, logs, delete, or `all`
(create -> setup -> run -> logs; `delete` is never implied). Arguments
after `--` are config overrides passed to every host. `--dry_run` prints
every command and runs none. Every host runs the same command; process 0
alone writes logs and metrics, all of them take part in checkpointing.
The workdir should be a gs:// URL that every host can reach.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evl_ecg_jax import tpu  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ACTIONS = ("create", "setup", "run", "logs", "delete")

_NAME = flags.DEFINE_string("name", None, "TPU VM / queued resource name.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone with that TPU type.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project ('' = default).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2",
                                "Slice topology, e.g. v5e:4x4, v5p:2x2x2.")
_QUEUED = flags.DEFINE_bool("queued", False,
                            "Create through queued-resources (waits).")
_SPOT = flags.DEFINE_bool("spot", False, "Spot (preemptible) capacity.")
_CONFIG = flags.DEFINE_string("config", "configs/default.py",
                              "--config of evl_ecg_jax.main (file:variants).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (gs://...).")
_ARCHIVE = flags.DEFINE_string("archive", "/tmp/evl-ecg-jax.tar.gz",
                               "Local tarball of the repository (setup).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print the commands, run none.")


def slice_from_flags() -> tpu.Slice:
  return tpu.Slice(name=_NAME.value, zone=_ZONE.value,
                   topology=tpu.topology(_TOPOLOGY.value),
                   project=_PROJECT.value, queued=_QUEUED.value,
                   spot=_SPOT.value)


def commands(actions, s: tpu.Slice, overrides=()) -> list[list[str]]:
  """The command lines of `actions`, in order."""
  out = []
  for action in actions:
    if action == "create":
      out += tpu.create(s)
    elif action == "setup":
      out += tpu.setup(s, _ARCHIVE.value)
    elif action == "run":
      if not _WORKDIR.value:
        raise app.UsageError("run: --workdir is required (a gs:// URL).")
      out += tpu.run(s, _CONFIG.value, _WORKDIR.value, overrides)
    elif action == "logs":
      out += tpu.logs(s)
    elif action == "delete":
      out += tpu.delete(s)
  return out


def main(argv):
  # absl drops the `--`; what follows it are the --config.* overrides.
  args = [a for a in argv[1:] if not a.startswith("--")]
  overrides = [a for a in argv[1:] if a.startswith("--")]
  actions = [a for arg in args for a in (
      ("create", "setup", "run", "logs") if arg == "all" else (arg,))]
  bad = [a for a in actions if a not in ACTIONS]
  if not actions or bad:
    raise app.UsageError(f"Actions {bad or '(none)'}: expected any of "
                         f"{ACTIONS} or 'all'.")
  for command in commands(actions, slice_from_flags(), overrides):
    print(shlex.join(command), flush=True)
    if not _DRY_RUN.value:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["name", "zone"])
  app.run(main)
