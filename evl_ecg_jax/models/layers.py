"""Building blocks shared by the ECG encoders.

Every parameter is created through `dense` / `conv` / `norm` below, which
attach logical axis names (`nn.with_logical_partitioning`); activations are
tagged with `constrain`. Logical names used here and mapped to mesh axes by
`config.sharding.rules` (see `parallel.param_shardings`):

  batch, length          activations [B, N, ...]
  embed, mlp, heads, kv  transformer widths (kernels and activations); kv is
                         the per-head width
  kv_heads               key/value heads of grouped-query attention (decoder)
  vocab                  token embedding table and LM head (decoder)
  channels_in, channels  conv kernels [window, in, out]; conv_window unsharded
  classes, norm          classifier outputs and norm scales (left unsharded)

A name that has no rule stays unsharded (flax maps it to None), so configs
only need rules for the names they want split.

Without rules in scope (`nn.logical_axis_rules`) the constraints are no-ops,
so the same modules run unchanged under `jax.pmap`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Standard 12-lead order of PTB-XL, CinC 2020/21 and CODE-15%.
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF",
         "V1", "V2", "V3", "V4", "V5", "V6")
LEAD_SETS = {"all": LEADS, "limb": LEADS[:6], "precordial": LEADS[6:]}
# Default hidden states handed back by a model (see `Taps`).
DEFAULT_TAPS = ("tokens", "pooled")


def lead_indices(spec: str) -> tuple[int, ...]:
  """Indices into LEADS of 'all' | 'limb' | 'precordial' | 'I+II' | 'I' ...

  Raises ValueError naming the unknown lead and the valid names.
  """
  if spec in LEAD_SETS:
    return tuple(LEADS.index(n) for n in LEAD_SETS[spec])
  names = [n.strip() for n in spec.replace(",", "+").split("+") if n.strip()]
  unknown = [n for n in names if n not in LEADS]
  if not names or unknown or len(set(names)) != len(names):
    raise ValueError(
        f"leads={spec!r}: expected one of {sorted(LEAD_SETS)} or distinct "
        f"lead names joined by '+' from {LEADS} (unknown: {unknown}).")
  return tuple(LEADS.index(n) for n in names)


def select_leads(ecg, spec: str):
  """[B, T, 12] -> [B, T, len(leads)] for the lead spec (see lead_indices)."""
  if spec == "all":
    return ecg
  if ecg.shape[-1] != len(LEADS):
    raise ValueError(f"leads={spec!r} selects from the 12 standard leads; "
                     f"got an input with {ecg.shape[-1]} leads.")
  # jnp.take: `ecg` may be a NumPy array (then `ecg[..., jax index]`
  # fails under jit) or a jax one.
  return jnp.take(ecg, jnp.asarray(lead_indices(spec)), axis=-1)


class Taps:
  """Collects a model's named hidden states that the caller asked for.

  A model calls `taps(name, x)` at every tap point (it returns `x`) and
  `taps.result()` at the end. `requested=None` keeps every tap; asking for a
  tap the model does not have raises ValueError listing the ones it has.
  Under jit the hidden states nobody asked for cost nothing.
  """

  def __init__(self, model: str, requested: Optional[Sequence[str]]):
    self.model = model
    self.requested = None if requested is None else tuple(requested)
    self.names: list[str] = []
    self.out: dict[str, Any] = {}

  def __call__(self, name: str, x):
    self.names.append(name)
    if self.requested is None or name in self.requested:
      self.out[name] = x
    return x

  def result(self) -> dict:
    missing = [t for t in (self.requested or ()) if t not in self.out]
    if missing:
      raise ValueError(f"{self.model}: unknown feature tap(s) {missing}; "
                       f"this model has {self.names}.")
    return self.out


def _partitioned(init: Callable, axes: Sequence[Optional[str]]):
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x, axes: Sequence[Optional[str]]):
  """Logical sharding constraint on an activation (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


def dense(features, axes, *, dtype, param_dtype=jnp.float32, use_bias=True,
          kernel_init=nn.initializers.lecun_normal(), name=None):
  """nn.Dense whose kernel [in, out] carries logical `axes` (in, out)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  param_dtype=param_dtype,
                  kernel_init=_partitioned(kernel_init, axes),
                  bias_init=_partitioned(nn.initializers.zeros, axes[-1:]),
                  name=name)


def conv(features, kernel_size, stride=1, *, dtype, param_dtype=jnp.float32,
         use_bias=True, feature_group_count=1, name=None):
  """1-D nn.Conv ('SAME' padding: ceil(T / stride) outputs), kernel
  [window, in, out] on logical axes (conv_window, channels_in, channels)."""
  return nn.Conv(
      features, (kernel_size,), (stride,), use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, feature_group_count=feature_group_count,
      kernel_init=_partitioned(nn.initializers.lecun_normal(),
                               ("conv_window", "channels_in", "channels")),
      bias_init=_partitioned(nn.initializers.zeros, ("channels",)), name=name)


def norm(kind: str, *, dtype, param_dtype=jnp.float32, zero_init=False,
         group_size=8, name=None):
  """'layer', 'group' or 'rms' norm; scale (and bias) on the 'norm' axis.

  `zero_init` starts the scale at 0 (the last norm of a residual branch, so
  the block starts as the identity: fastai's zero_bn / Goyal et al. 2017).
  """
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, name=name,
                scale_init=_partitioned(scale_init, ("norm",)))
  if kind == "rms":  # RMSNorm (no bias, no centering): the decoder LM's.
    return nn.RMSNorm(**kwargs)
  kwargs["bias_init"] = _partitioned(nn.initializers.zeros, ("norm",))
  if kind == "layer":
    return nn.LayerNorm(**kwargs)
  if kind == "group":
    return nn.GroupNorm(num_groups=None, group_size=group_size, **kwargs)
  raise ValueError(f"norm={kind!r}: expected 'layer', 'group' or 'rms'.")


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dropout -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
    x = constrain(x, ("batch", "length", "mlp"))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(width, ("mlp", "embed"), name="fc2", **kw)(x)


class Attention(nn.Module):
  """Multi-head self-attention.

  Q, K, V and output kernels are [embed, heads * head_dim] on logical axes
  (embed, heads): sharding "heads" splits whole heads when the mesh axis
  divides num_heads. (flax's DenseGeneral initialises multi-dim kernels
  flattened, which logical partitioning metadata cannot describe.)
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Attention: width {width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads = lambda y: constrain(
        y.reshape(y.shape[:-1] + (self.num_heads, -1)),
        ("batch", "length", "heads", "kv"))
    q, k, v = (heads(dense(width, ("embed", "heads"), name=n, **kw)(x))
               for n in ("query", "key", "value"))
    drop = self.dropout > 0 and train
    y = nn.dot_product_attention(
        q, k, v, dropout_rate=self.dropout if drop else 0.0,
        dropout_rng=self.make_rng("dropout") if drop else None,
        deterministic=not drop, dtype=self.dtype)
    y = y.reshape(y.shape[:-2] + (width,))
    return dense(width, ("heads", "embed"), name="out", **kw)(y)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer encoder block (ViT)."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = norm("layer", name="ln1", **kw)(x)
    y = Attention(self.num_heads, self.dropout, name="attn", **kw)(
        y, train=train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = norm("layer", name="ln2", **kw)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, name="mlp", **kw)(y, train=train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    return constrain(x, ("batch", "length", "embed"))


class _ScannedEncoderBlock(EncoderBlock):
  """EncoderBlock as an nn.scan body: x -> (x, x). The stacked outputs are
  the per-block taps; under jit they cost nothing when no tap reads them
  (dead scan outputs are removed)."""

  def __call__(self, x, train: bool = False):
    x = super().__call__(x, train)
    return x, x


def scanned(block_cls, *, depth: int, remat: bool, static_argnums=(),
            in_axes=()):
  """`depth` copies of `block_cls` as one nn.scan: params stacked on a
  leading "layers" logical axis (unsharded unless a rule names it), one
  compiled block instead of `depth`; with `remat` each block is recomputed
  in the backward pass (prevent_cse=False, as flax advises under scan)."""
  if remat:
    block_cls = nn.remat(block_cls, prevent_cse=False,
                         static_argnums=static_argnums)
  return nn.scan(block_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=depth,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def encoder_stack(x, record: Optional[Taps], *, depth, num_heads, mlp_dim,
                  dropout=0.0, train=False, remat=False, scan=False, **kw):
  """`depth` EncoderBlocks (ViT), recording tap "block{i}" after block i.

  Unrolled, params are "block{i}"; with `scan`, one nn.scan named "blocks"
  whose params carry a leading depth axis (`block_layout` converts). Call
  inside a compact method: the blocks belong to it.
  """
  record = record or Taps("", None)
  if not scan:
    block = (nn.remat(EncoderBlock, static_argnums=(2,)) if remat
             else EncoderBlock)
    for i in range(depth):
      x = block(num_heads, mlp_dim, dropout, name=f"block{i}", **kw)(x, train)
      record(f"block{i}", x)
    return x
  stack = scanned(_ScannedEncoderBlock, depth=depth, remat=remat,
                  static_argnums=(2,), in_axes=(nn.broadcast,))
  x, outs = stack(num_heads, mlp_dim, dropout, name="blocks", **kw)(x, train)
  for i in range(depth):
    record(f"block{i}", outs[i])
  return x


def block_layout(params, target, *, prefix: str = "block",
                 stacked: str = "blocks"):
  """`params` in the block layout of `target` (same model, any layout).

  Converts, at every level of the tree, unrolled blocks "block0".."block{n-1}"
  into one scanned "blocks" subtree (leaves stacked on axis 0) or back, as
  `target` (a tree of arrays or ShapeDtypeStructs, e.g. the abstract params
  of the model to load into) has them. Lets a teacher trained unrolled be
  distilled with scanned stacks, and a scanned model be exported unrolled.
  Stacks on the host (NumPy): a 7B teacher is not gathered on one device.
  """
  if not isinstance(params, dict) or not isinstance(target, dict):
    return params
  params = dict(params)
  unrolled = lambda tree: sorted(
      (k for k in tree if k.startswith(prefix) and k[len(prefix):].isdigit()),
      key=lambda k: int(k[len(prefix):]))
  if stacked in target and stacked not in params and unrolled(params):
    blocks = [params.pop(k) for k in unrolled(params)]
    params[stacked] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  elif stacked in params and stacked not in target and unrolled(target):
    tree = params.pop(stacked)
    for i, k in enumerate(unrolled(target)):
      params[k] = jax.tree.map(lambda x, i=i: x[i], tree)
  return {k: block_layout(v, target.get(k), prefix=prefix, stacked=stacked)
          for k, v in params.items()}


def in_classifier_head(path) -> bool:
  """Whether a param path (jax.tree_util key path) is in a model's
  ClassifierHead (every family builds it unnamed: ClassifierHead_0)."""
  return any(getattr(k, "key", None) == "ClassifierHead_0" for k in path)


class ClassifierHead(nn.Module):
  """Dropout + Dense to `num_classes` logits, computed in float32."""
  num_classes: int
  dropout: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled, *, train: bool):
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return dense(self.num_classes, ("embed", "classes"), dtype=jnp.float32,
                 param_dtype=self.param_dtype, name="head")(pooled)


def finish(taps: Taps, head: ClassifierHead, tokens, pooled, *, train: bool):
  """Common tail of every encoder: records tokens/pooled, applies the head.

  Returns the (logits [B, C], {tap: hidden state}) contract of all models.
  """
  taps("tokens", tokens)
  taps("pooled", pooled)
  logits = head(pooled, train=train)
  return logits, taps.result()

