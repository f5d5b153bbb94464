"""What a step moves and computes, read from shapes and jaxprs without
compiling (flag-free: evl_ecg_jax/aot.py reports it, tests import it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_shapes(config, batch, student, teacher, objective, example):
  """ShapeDtypeStructs of the objective's (heads, student outputs, teacher
  outputs, labels) for a global batch of a signal config."""
  taps_s, taps_t = (objective.model_taps("student"),
                    objective.model_taps("teacher"))
  s_out = jax.eval_shape(lambda x: student.init_with_output(
      jax.random.PRNGKey(0), x, taps=taps_s)[0], example)
  t_out = jax.eval_shape(lambda x: teacher.init_with_output(
      jax.random.PRNGKey(0), x, taps=taps_t)[0], example)
  grow = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype), t)
  s_out, t_out = grow(s_out), grow(t_out)
  labels = jax.ShapeDtypeStruct((batch, len(config.data.class_names)),
                                jnp.float32)
  heads = None
  if objective.heads is not None:
    heads = jax.eval_shape(lambda s, t: objective.init_heads(
        jax.random.PRNGKey(0), s, t), s_out[1], t_out[1])
  return heads, s_out, t_out, labels


_COLLECTIVES = ("all_gather", "ppermute", "psum", "psum_invariant",
                "reduce_scatter", "psum_scatter", "all_to_all", "pmax",
                "pmin")


def cross_record_bytes(objective, shapes, shards: int) -> dict:
  """{collective: bytes one device receives} of the objective's value and
  gradient per device on `shards` data shards (the named-axis step of
  pmap / shard_map; docs/scale.md): what its cross-record terms move per
  step (all_gather of the batch relations' embeddings and its transpose,
  the control's ppermute, the masked means' psums). `shapes`: the global
  (heads, student out, teacher out, labels) of `loss_shapes`. A collective
  in a loop body counts once (the objective's are outside loops)."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name

  def per_device(heads, s_out, t_out, labels):
    grad = jax.grad(lambda h, s: objective(h, s, t_out, labels,
                                           axis_name="data")[0],
                    argnums=(0, 1))
    return grad(heads, s_out)

  mesh = jax.sharding.AbstractMesh((shards,), ("data",))
  rows = P("data")
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, rows, rows),
                     out_specs=(P(), rows), check_vma=False)
  totals = {}
  for eqn in _eqns(jax.make_jaxpr(fn)(*shapes).jaxpr):
    if eqn.primitive.name in _COLLECTIVES:
      totals[eqn.primitive.name] = totals.get(eqn.primitive.name, 0) + sum(
          v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars)
  return totals


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its equations' params."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)
