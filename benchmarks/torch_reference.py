r"""Our losses against an independent PyTorch implementation, same CPU.

  pip install -e '.[torch-reference]'   # PyTorch (a large wheel)
  python benchmarks/torch_reference.py --out=workdir/benchmarks

Forward + backward with respect to the student's tokens, at paper scale
(B = 32 sequences, teacher N = 256 tokens, student M = 64, widths 512 and
1024), each framework on the same threads of this machine:
- relation: EVL's L_rel (losses.relation_loss) between the aligned teacher
  [B, M, D] and the student [B, M, D];
- OT, plan stopped: ⟨P, C⟩ with C the squared Euclidean cost and P the
  entropic plan (ε = 0.1, uniform marginals) after exactly 100 log-domain
  Sinkhorn iterations, held constant in the gradient (losses.ot_loss with
  plan_gradient="stop", a threshold no solve meets and max_iterations=100).
The PyTorch side is written here from the formulas, not from our code. Its
values are compared with ours (relative difference) before anything is
timed, so the two sides compute the same thing. Writes torch_reference.json
and .md; "ours / torch" > 1 means ours is slower.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _timing  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_WIDTHS = flags.DEFINE_list("widths", ["512", "1024"], "Token widths D.")
_CALLS = flags.DEFINE_integer("calls", 3, "Timed calls per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")

B, N, M = 32, 256, 64
EPSILON, ITERATIONS = 0.1, 100


def _torch_relation(torch, t, s):
  """½ (L_D + L_A) over the pairs i ≠ j of each sequence (EVL-ECG)."""
  off = 1.0 - torch.eye(t.shape[1], dtype=t.dtype)

  def normalized_distances(x):
    d = torch.cdist(x, x) * off
    return d / (d.sum((1, 2), keepdim=True) / off.sum())

  def cosines(x):
    u = torch.nn.functional.normalize(x, dim=-1)
    return u @ u.transpose(1, 2)

  pair_mean = lambda x: (x * off).sum((1, 2)) / off.sum()
  loss_d = pair_mean((normalized_distances(t) - normalized_distances(s)) ** 2)
  loss_a = pair_mean((cosines(t) - cosines(s)) ** 2)
  return (0.5 * (loss_d + loss_a)).mean()


def _torch_ot_stopped(torch, t, s):
  """⟨P, C⟩, P after ITERATIONS log-domain Sinkhorn steps, held constant."""
  cost = ((t * t).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
          - 2.0 * t @ s.transpose(1, 2)).clamp_min(0.0)
  with torch.no_grad():
    c = cost.detach()
    log_a, log_b = -np.log(t.shape[1]), -np.log(s.shape[1])
    f = torch.zeros(c.shape[:2], dtype=c.dtype)
    g = torch.zeros((c.shape[0], c.shape[2]), dtype=c.dtype)
    for _ in range(ITERATIONS):  # ott-jax's order: g from f, then f from g
      g = EPSILON * log_b - EPSILON * torch.logsumexp(
          (f[:, :, None] - c) / EPSILON, dim=1)
      f = EPSILON * log_a - EPSILON * torch.logsumexp(
          (g[:, None, :] - c) / EPSILON, dim=2)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / EPSILON)
  return (plan * cost).sum((1, 2)).mean()


def _torch_case(torch, fn, *arrays):
  """Forward + backward wrt the last array (the student)."""
  *fixed, student = [torch.from_numpy(np.asarray(x)) for x in arrays]

  def run():
    s = student.detach().requires_grad_(True)
    value = fn(torch, *fixed, s)
    value.backward()
    return value.detach().numpy(), s.grad.numpy()
  return run


def _jax_case(fn, *arrays):
  """Forward + backward wrt the last array; every array is an argument (a
  closed-over teacher would be a constant that XLA folds at compile time)."""
  arrays = [jnp.asarray(x) for x in arrays]
  grad = jax.jit(jax.value_and_grad(fn, argnums=len(arrays) - 1))
  return functools.partial(grad, *arrays)


def _cases(torch, width):
  rng = np.random.default_rng(0)
  arr = lambda *shape: rng.normal(size=shape).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  aligned, student = arr(B, M, width), arr(B, M, width)
  teacher, projected = unit(arr(B, N, width)), unit(arr(B, M, width))
  ot = functools.partial(losses.ot_loss, epsilon=EPSILON,
                         plan_gradient="stop", solver=losses.ot.Solver.of(
                             0.0, ITERATIONS, 1, 1.0))
  return {
      "relation": (_jax_case(losses.relation_loss, aligned, student),
                   _torch_case(torch, _torch_relation, aligned, student)),
      "OT, plan stopped": (_jax_case(ot, teacher, projected),
                           _torch_case(torch, _torch_ot_stopped, teacher,
                                       projected)),
  }


def _rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  result = {"shape_b_n_m": (B, N, M), "epsilon": EPSILON,
            "sinkhorn_iterations": ITERATIONS, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "widths": {}}
  rows = []
  for width in map(int, _WIDTHS.value):
    cases, timed = _cases(torch, width), {}
    for name, (ours, theirs) in cases.items():
      (v_ours, g_ours), (v_torch, g_torch) = ours(), theirs()
      result["widths"].setdefault(width, {})[name] = {
          "value_rel_diff": _rel(v_ours, v_torch),
          "grad_rel_diff": _rel(g_ours, g_torch)}
      timed[f"{name}/ours"] = ours
      timed[f"{name}/torch"] = lambda fn=theirs: (fn(), None)[1]
    times = _timing.time_interleaved(timed, calls=_CALLS.value,
                                     repeats=_REPEATS.value)
    for name in cases:
      row = result["widths"][width][name]
      row.update(ours_s=times[f"{name}/ours"], torch_s=times[f"{name}/torch"])
      row["ours_over_torch"] = row["ours_s"] / row["torch_s"]
      rows.append([str(width), name, f"{row['ours_s'] * 1e3:.2f}",
                   f"{row['torch_s'] * 1e3:.2f}",
                   f"{row['ours_over_torch']:.2f}",
                   f"{row['value_rel_diff']:.1e} / {row['grad_rel_diff']:.1e}"])
  print(_timing.write_report(
      _OUT.value, "torch_reference", result,
      ["width", "loss (fwd + bwd)", "ours ms", "torch ms", "ours / torch",
       "rel. diff value / grad"], rows))


if __name__ == "__main__":
  app.run(main)
