"""Cloud TPU facts and `gcloud` command lines (pure: nothing is run here).

`launch/tpu.py` runs or prints (`--dry_run`) the commands built here;
`evl_ecg_jax/aot.py` reads the chip table; `evl_ecg_jax/sweep.py` emits one
launch per sweep point.
"""

from __future__ import annotations

import dataclasses
import math
import shlex


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what a slice of it is called and what a chip has."""
  generation: str  # topology prefix, as jax.experimental.topologies names it
  accelerator_prefix: str  # gcloud --accelerator-type prefix
  cores_per_chip: int  # the accelerator-type suffix counts TensorCores
  runtime_version: str  # TPU VM software image
  hbm_gib: float  # HBM per chip
  bf16_tflops: float  # peak dense bf16 per chip (Google's spec sheets)


CHIPS = {
    "v4": Chip("v4", "v4", 2, "tpu-ubuntu2204-base", 32.0, 275.0),
    "v5e": Chip("v5e", "v5litepod", 1, "v2-alpha-tpuv5-lite", 16.0, 197.0),
    "v5p": Chip("v5p", "v5p", 2, "v2-alpha-tpuv5", 95.0, 459.0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # e.g. "v5e:4x4"
  chip: Chip
  dims: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def accelerator_type(self) -> str:
    """gcloud's name: v5e:4x4 -> v5litepod-16, v5p:2x2x2 -> v5p-16."""
    return (f"{self.chip.accelerator_prefix}-"
            f"{self.num_chips * self.chip.cores_per_chip}")


def topology(name: str) -> Topology:
  """Parses "v5e:2x2" / "v5p:2x2x2" (ValueError naming what is expected)."""
  gen, sep, dims = name.partition(":")
  if not sep or gen not in CHIPS:
    raise ValueError(f"--topology={name!r}: expected <generation>:<dims> "
                     f"with a generation in {sorted(CHIPS)}, e.g. v5e:2x2 "
                     "or v5p:2x2x2.")
  try:
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    shape = ()
  want = 2 if gen == "v5e" else 3
  if len(shape) != want or min(shape) < 1:
    raise ValueError(f"--topology={name!r}: a {gen} topology has {want} "
                     f"dims like {'2x2' if want == 2 else '2x2x2'}.")
  return Topology(name, CHIPS[gen], shape)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU VM slice to create, set up, run on and delete."""
  name: str
  zone: str
  topology: Topology
  project: str = ""
  queued: bool = False  # a queued resource (waits for capacity)
  spot: bool = False

  def where(self) -> list[str]:
    out = [f"--zone={self.zone}"]
    return out + ([f"--project={self.project}"] if self.project else [])

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name]
            + self.where() + [f"--worker={worker}",
                               f"--command={command}"])


def create(s: Slice) -> list[list[str]]:
  """Create the slice (directly, or as a queued resource + wait until it
  is ACTIVE)."""
  kind = [f"--accelerator-type={s.topology.accelerator_type}"]
  spot = ["--spot"] if s.spot else []
  if not s.queued:
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", s.name]
            + s.where() + kind
            + [f"--version={s.topology.chip.runtime_version}"] + spot]
  return [
      ["gcloud", "compute", "tpus", "queued-resources", "create", s.name,
       f"--node-id={s.name}"] + s.where() + kind
      + [f"--runtime-version={s.topology.chip.runtime_version}"] + spot,
      ["bash", "-c", "until gcloud compute tpus queued-resources describe "
       + " ".join(shlex.quote(a) for a in [s.name] + s.where())
       + " --format='value(state.state)' | grep -q ACTIVE; do sleep 30; "
       "done"]]


def setup(s: Slice, archive: str, remote_dir: str = "evl-ecg-jax"
          ) -> list[list[str]]:
  """Copy the package (a `git archive` tarball) to every worker and install
  it with the [tpu] extra (jax + the matching libtpu, GCS clients)."""
  base = archive.rsplit("/", 1)[-1]
  return [
      ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
       f"{s.name}:~/{base}"] + s.where() + ["--worker=all"],
      s.ssh(
          f"mkdir -p {remote_dir} && tar -xzf ~/{base} -C {remote_dir} && "
          f"python3 -m pip install -q -e './{remote_dir}[tpu]'"),
  ]


def run(s: Slice, config: str, workdir: str, overrides=(),
        remote_dir: str = "evl-ecg-jax", log: str = "run.log"
        ) -> list[list[str]]:
  """Start the same run on every host (jax.distributed finds its peers
  from the TPU metadata), detached, logging to ~/<log>."""
  args = ["python3", "-m", "evl_ecg_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--jax_distributed"] + list(overrides)
  command = (f"cd {remote_dir} && nohup "
             + " ".join(shlex.quote(a) for a in args)
             + f" > ~/{log} 2>&1 &")
  return [s.ssh(command)]


def logs(s: Slice, log: str = "run.log") -> list[list[str]]:
  """Stream process 0's log (it alone writes metrics and prints)."""
  return [s.ssh(f"tail -n 200 -f ~/{log}", worker="0")]


def delete(s: Slice) -> list[list[str]]:
  if s.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete",
             s.name] + s.where() + ["--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name]
          + s.where() + ["--quiet"]]
