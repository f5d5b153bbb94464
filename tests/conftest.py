"""Test setup: 8 fake CPU devices (set before jax is imported) and shared data."""

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    # Under pytest-xdist (`make test`: a worker per core) each worker runs
    # XLA's ops on one thread: two workers with a thread pool each
    # oversubscribed the cores (measured on 2 cores: 4 test files took 225 s
    # with the pools, 200 s without).
    *(["--xla_cpu_multi_thread_eigen=false",
       "intra_op_parallelism_threads=1"]
      if "PYTEST_XDIST_WORKER" in os.environ else [])]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the
# subprocesses tests start and with pytest-xdist's workers (the environment
# is inherited from the process that created it): many tests compile the
# same programs (a runlocal step, evaluation, a restarted run). It starts
# empty and is removed when its creator exits, so nothing carries over
# between sessions; EVL_TEST_JAX_CACHE=0 turns it off.
if (os.environ.get("EVL_TEST_JAX_CACHE", "1") != "0"
    and "EVL_TEST_JAX_CACHE_OWNER" not in os.environ):
  import atexit  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _CACHE = tempfile.mkdtemp(prefix="evl-ecg-jax-test-cache-")
  atexit.register(lambda: __import__("shutil").rmtree(_CACHE, True))
  os.environ["EVL_TEST_JAX_CACHE_OWNER"] = str(os.getpid())
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  # A size limit turns on jax's file lock around cache reads and writes;
  # without it a process can read an entry another is still writing. (It
  # was added after a worker aborted in XLA; that abort came back with the
  # lock, see train/trainer.py _IN_FLIGHT.)
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import csv  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs/` is read as files by main; tests import it.
# Real ECGs beside the repo (present in CI); tests that need them skip
# without, saying so.
DATA = os.environ.get("EVL_ECG_DATA",
                      os.path.join(os.path.dirname(REPO), "shared", "data"))


def family_params(families, default=("cnn1d", "vit1d")):
  """Parametrisation over model families: the demo's student and teacher
  (`default`) in the default suite, the others under `slow` (`make
  test-slow` runs every family; the suite keeps to a modest machine)."""
  return [f if f in default else pytest.param(f, marks=pytest.mark.slow)
          for f in families]


def set_fields(config, fields):
  """Sets dotted config fields in place, adding a field a block does not
  list (a model block takes any module attribute, e.g. teacher.lead_groups,
  which config_lib.override refuses); returns `config`."""
  for key, value in fields.items():
    *blocks, field = key.split(".")
    node = config
    for block in blocks:
      node = node[block]
    node[field] = value
  return config


def short_run(tfds_dir, arg, steps, batch_size=32):
  """configs/default.py at `arg` + runlocal on the test data: `steps`
  steps of `batch_size`, logged, evaluated and checkpointed once at the
  end."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config(arg + ",runlocal")
  config.data.data_dir = tfds_dir
  config.data.batch_size = batch_size
  config.total_steps = steps
  config.log_every_steps = config.eval_every_steps = steps
  config.ckpt_every_steps = steps
  return config


def write_ptbxl_db(root, rows, fields):
  """Writes rows as `root`/ptbxl_database.csv."""
  with open(root / "ptbxl_database.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def copy_ptbxl(tmp_path, n):
  """The first n records of DATA/ptbxl (folds as in the CSV) copied into a
  temporary PTB-XL folder; returns (root, rows, CSV fields)."""
  src = os.path.join(DATA, "ptbxl")
  root = tmp_path / "ptbxl"
  root.mkdir()
  shutil.copy(os.path.join(src, "scp_statements.csv"), root)
  with open(os.path.join(src, "ptbxl_database.csv"), newline="") as f:
    reader = csv.DictReader(f)
    rows, fields = [r for _, r in zip(range(n), reader)], reader.fieldnames
  write_ptbxl_db(root, rows, fields)
  for r in rows:
    for ext in (".hea", ".dat"):
      dst = root / (r["filename_lr"] + ext)
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(os.path.join(src, r["filename_lr"] + ext), dst)
  return root, rows, fields


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir holding synthetic_ecg/tiny, built once per session."""
  from evl_ecg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg = ml_collections.ConfigDict({
      "tfds_name": "synthetic_ecg/tiny", "data_dir": data_dir,
      "manual_dir": "", "splits": {"train": "train"}})
  pipeline.source(cfg, "train")
  return data_dir


# `make test` runs two pytest-xdist workers, one test file each at a time
# (--dist loadfile keeps a file's module fixtures on one worker). With
# --no-loadscope-reorder files are handed out in collection order, so the
# longest ones (measured with --durations=0 under `make test`: 110 s down
# to 30 s) go first and the many short files fill in behind them instead
# of one long file finishing alone at the end.
_LONGEST_FIRST = (
    "train/global_batch_test.py", "losses/ot_test.py", "train/preemption_test.py",
    "train/parallel_modes_test.py", "teachers/exported_teacher_test.py",
    "export/export_test.py",
    "losses/evl_test.py", "smoke_test.py", "train/diagnostics_test.py",
    "vlm/fit_test.py", "models/models_test.py", "train/transfer_test.py",
    "losses/baselines_test.py", "models/decoder_test.py",
    "models/vlm_test.py", "launch/launch_test.py",
    "train/multiprocess_test.py", "data/ptbxl_test.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return (_LONGEST_FIRST.index(path) if path in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_report_header(config):
  """The machine's speed in the header, to read the suite's time against
  (this 2-core machine's own rate varies: 260-430 GFLOP/s on one day)."""
  del config
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = 2048
  x = jax.device_put(np.ones((n, n), np.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return (f"machine: dense f32 {n}² matmul in jax at "
          f"{2 * n**3 / np.median(times) / 1e9:.0f} GFLOP/s (median of 5)")
