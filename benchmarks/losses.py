r"""Forward + backward cost of each loss, at demo and at paper scale.

  python benchmarks/losses.py --out=workdir/benchmarks [--scales=demo,paper]

Each case is `jit(value_and_grad)` of one loss with respect to the student's
features and the learned heads, on random features (B = 32):
  demo:  teacher 250 tokens x 64, student 63 tokens x 32 (configs/default.py)
  paper: teacher 256 tokens x 1024, student 64 tokens x 2048; the OT
         projection maps the student to the teacher width 1024.
"EVL" is the full feature objective (MHCA + guard, relation, OT); OT's share
of it is reported both as OT alone / EVL and as 1 − (EVL without OT) / EVL.
Writes losses.json and losses.md; compare ratios, not seconds.

Then EVL's OT term as configured (configs/default.py loss=evl) under each
Sinkhorn setting of SOLVERS (error check every k iterations, momentum ω),
on smoothly drifting unit tokens: the iterations of the teacher-to-student
solve (mean / max over the batch), the time of value + gradient against
ott-jax's default (k = 10, ω = 1), and the value's and gradient's relative
deviation from a tight solve (threshold 1e-5). Writes sinkhorn.json / .md.
"""

from __future__ import annotations

import dataclasses
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
from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from evl_ecg_jax.losses import terms as terms_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "workdir/benchmarks", "Output directory.")
_SCALES = flags.DEFINE_list("scales", ["demo", "paper"], "Scales to run.")
_CALLS = flags.DEFINE_integer("calls", 3, "Timed calls per round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timing rounds.")

SCALES = {  # (B, N, Dt, M, Ds, MHCA heads, MHCA qkv width)
    "demo": (32, 250, 64, 63, 32, 2, 32),
    "paper": (32, 256, 1024, 64, 2048, 8, 1024),
}
OT = terms_lib.OT(epsilon=0.1).settings()  # the paper's form, the defaults


def _objective_case(on, heads, qkv, h_s, h_t):
  """value_and_grad of the feature terms `on` (weight 1) wrt (heads,
  student)."""
  settings = dict(mhca=dict(num_heads=heads, qkv_features=qkv), ot=OT)
  objective = losses.build_objective(alpha=1.0, terms={
      name: dict(settings.get(name, {}), weight=1.0) for name in on})
  params = objective.init_heads(jax.random.PRNGKey(0), {"tokens": h_s},
                                {"tokens": h_t})

  def loss(params, h_s, h_t):
    terms = objective.distill_terms(params, (None, {"tokens": h_s}),
                                    (None, {"tokens": h_t}))
    # α = 1: the task term drops out of Eq. 9.
    return losses.evl_loss(0.0, terms, alpha=1.0,
                           weights=objective.term_weights)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return functools.partial(fn, params, h_s, h_t)


def _pure_case(loss, *args):
  fn = jax.jit(jax.value_and_grad(loss, argnums=1))
  return functools.partial(fn, *args)


def _cases(scale):
  b, n, dt, m, ds, heads, qkv = SCALES[scale]
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  h_t, h_s = arr(b, n, dt), arr(b, m, ds)
  t_unit = losses.evl.unit_tokens(h_t)
  s_unit = losses.evl.unit_tokens(arr(b, m, dt))
  obj = functools.partial(_objective_case, heads=heads, qkv=qkv, h_s=h_s,
                          h_t=h_t)
  return {
      "logit KD (5 classes)": _pure_case(
          functools.partial(losses.logit_kd_loss, temperature=2.0),
          arr(b, 5), arr(b, 5)),
      "relation (aligned teacher, student)": _pure_case(
          losses.relation_loss, arr(b, m, ds), h_s),
      "OT, projected tokens, implicit grad": _pure_case(
          functools.partial(losses.ot_loss, **OT), t_unit, s_unit),
      "OT, projected tokens, plan stopped": _pure_case(
          functools.partial(losses.ot_loss, **dict(OT, plan_gradient="stop")),
          t_unit, s_unit),
      "MHCA: aligner + L_mhca + guard": obj(("mhca",)),
      "OT term: projection + L_ot": obj(("ot",)),
      "EVL: MHCA + relation + OT": obj(("mhca", "relation", "ot")),
      "EVL without OT": obj(("mhca", "relation")),
  }


# Sinkhorn settings tried for EVL's OT term (configs/default.py loss=evl:
# relative ε, debiased, temporal cost, plan stopped, threshold 1e-2):
# (terms.ot.inner_iterations, terms.ot.momentum).
SOLVERS = ((10, 1.0), (5, 1.0), (1, 1.0), (10, 1.3), (5, 1.3), (1, 1.3),
           (5, 1.5), (1, 1.5))


def _smooth_tokens(rng, b, n, d):
  """Unit tokens that drift along the sequence (like ECG features: nearby
  tokens alike), not i.i.d. noise, so the plan has time structure."""
  x = np.cumsum(rng.normal(size=(b, n, d)), axis=1) / np.sqrt(n)
  x = x + 0.5 * rng.normal(size=(b, n, d))
  return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True),
                     jnp.float32)


def _solver_rows(scale):
  """EVL's OT (value + gradient) per Sinkhorn setting: time, iterations of
  the teacher-to-student solve, and the deviation from a tight solve."""
  b, n, dt, m, _, _, _ = SCALES[scale]
  evl = terms_lib.build("ot", default.get_config(
      "mode=distill,loss=evl").loss.terms.ot)
  rng = np.random.default_rng(1)
  t, s = _smooth_tokens(rng, b, n, dt), _smooth_tokens(rng, b, m, dt)
  # The teacher is an argument: closed over, XLA would fold its side.
  grad = lambda part: jax.jit(jax.value_and_grad(
      lambda t, s: losses.ot_loss(t, s, **part.settings()), argnums=1))
  ref_value, ref_grad = grad(dataclasses.replace(
      evl, threshold=1e-5, max_iterations=5000, inner_iterations=10,
      momentum=1.0))(t, s)
  cases, out = {}, {}
  for inner, omega in SOLVERS:
    name = f"inner {inner}, ω {omega}"
    part = dataclasses.replace(evl, inner_iterations=inner, momentum=omega)
    fn = grad(part)
    cases[name] = functools.partial(fn, t, s)
    value, g = fn(t, s)
    _, iters = losses.ot.transport_plans(t, s, **part.settings(),
                                         with_iterations=True)
    out[name] = {
        "iterations_mean": float(np.mean(iters)),
        "iterations_max": int(np.max(iters)),
        "value_rel_error": float(abs(value - ref_value) / abs(ref_value)),
        "grad_rel_error": float(jnp.linalg.norm(g - ref_grad)
                                / jnp.linalg.norm(ref_grad))}
  times = _timing.time_interleaved(cases, calls=_CALLS.value,
                                   repeats=_REPEATS.value)
  base = times[f"inner {SOLVERS[0][0]}, ω {SOLVERS[0][1]}"]
  for name, sec in times.items():
    out[name].update(seconds=sec, vs_default=sec / base)
  return out


def main(argv):
  del argv
  result, rows = {"calls": _CALLS.value, "repeats": _REPEATS.value,
                  "scales": {}}, []
  for scale in _SCALES.value:
    times = _timing.time_interleaved(_cases(scale), calls=_CALLS.value,
                                     repeats=_REPEATS.value)
    evl = times["EVL: MHCA + relation + OT"]
    summary = {"ot_term_over_evl": times["OT term: projection + L_ot"] / evl,
               "one_minus_no_ot_over_evl": 1 - times["EVL without OT"] / evl}
    result["scales"][scale] = {"shape_b_n_dt_m_ds_heads_qkv": SCALES[scale],
                               "seconds": times, **summary}
    rows += [[scale, name, f"{sec * 1e3:.2f}", f"{sec / evl:.2f}"]
             for name, sec in times.items()]
    rows.append([scale, "**OT's share of EVL**",
                 f"{summary['ot_term_over_evl']:.0%} (alone) / "
                 f"{summary['one_minus_no_ot_over_evl']:.0%} (removed)", ""])
  print(_timing.write_report(_OUT.value, "losses", result,
                             ["scale", "loss (fwd + bwd)", "ms", "vs EVL"],
                             rows))
  solver, rows = {}, []
  for scale in _SCALES.value:
    solver[scale] = _solver_rows(scale)
    rows += [[scale, name, f"{r['iterations_mean']:.1f} / "
              f"{r['iterations_max']}", f"{r['seconds'] * 1e3:.2f}",
              f"{r['vs_default']:.2f}", f"{r['value_rel_error']:.1e}",
              f"{r['grad_rel_error']:.1e}"]
             for name, r in solver[scale].items()]
  print(_timing.write_report(
      _OUT.value, "sinkhorn", {"scales": solver, "solvers": SOLVERS},
      ["scale", "Sinkhorn (EVL's OT)", "iterations mean / max", "ms",
       "vs inner 10, ω 1", "value rel. error", "grad rel. error"], rows))


if __name__ == "__main__":
  app.run(main)
