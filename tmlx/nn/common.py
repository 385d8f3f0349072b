"""Small building blocks shared by the tmlx modules.

Parameters are created in `param_dtype` and cast to the compute `dtype` where they are used.

Dimensions:
  B  batch
  D  model width
  I  input features of a generic layer
  O  output features of a generic layer
  S  query positions
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Integer, Shaped

from tmlx import sharding

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Dtypes:
  """Parameter and compute dtypes, handed from a parent module to its children."""

  param: DTypeLike = jnp.float32
  compute: DTypeLike = jnp.float32


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str | None], dtype) -> nnx.Param:
  """A parameter whose dimensions carry logical axis names (mapped to the mesh by the rules)."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


def fan_in_init(fan_in_axes: int = 1) -> Initializer:
  """Truncated-normal init scaled by the product of the first `fan_in_axes` dims."""

  def init(key, shape, dtype):
    fan_in = 1
    for d in shape[:fan_in_axes]:
      fan_in *= d
    std = fan_in**-0.5
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)

  return init


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


class Dense(nnx.Module):
  """x · kernel (+ bias) over the last axis of x: [..., I] → [..., O]; `names` are the logical axis
  names of the kernel [I, O]."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtypes: Dtypes,
    use_bias: bool = False,
    init: Initializer | None = None,
  ):
    self.dtypes = dtypes
    self.kernel = param(rngs, init or fan_in_init(), (d_in, d_out), names, dtypes.param)
    self.bias = param(rngs, zeros_init, (d_out,), (names[1],), dtypes.param) if use_bias else None

  def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
    dt = self.dtypes.compute
    y = jnp.einsum("...i,io->...o", x.astype(dt), self.kernel[...].astype(dt))
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis [..., I] (D, H or a stem width), computed in fp32, returned in the
  compute dtype."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtypes: Dtypes, eps: float = 1e-6, name: str | None = None):
    self.dtypes = dtypes
    self.eps = eps
    self.scale = param(rngs, lambda k, s, d: jnp.ones(s, d), (dim,), (name,), dtypes.param)

  def __call__(self, x: Float[Array, "*lead I"]) -> Float[Array, "*lead I"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtypes.compute)


def layer_norm(x: Float[Array, "*lead I"], eps: float = 1e-6) -> Float[Array, "*lead I"]:
  """LayerNorm over the last axis without affine parameters, in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def lookup(table: Shaped[Array, "_ D"], ids: Integer[Array, "*lead"], row_axis: str | None) -> Shaped[Array, "*lead D"]:
  """`table[ids]` for an embedding table [rows, D] whose D is sharded over fsdp ('embed').

  The table is first gathered whole along D (rows stay split by `row_axis`'s rule). Taken from
  the fsdp-split table directly, the rows would come out split along D, and in the backward pass
  their batch-split cotangent would have to be resharded to that layout, which GSPMD can only do
  by replicating the whole [B, S, D] cotangent on every chip ("involuntary full
  rematerialization"). Gathered first, the gradient is a local scatter-add followed by the
  reduce-scatter every fsdp parameter's gradient gets.
  """
  table = sharding.constrain(table, (row_axis, None))
  return jnp.take(table, ids, axis=0)


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
  """`count` copies of a module with parameters stacked on a leading 'layers' axis."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  return create(rngs)


def scan_modules(stacked: nnx.Module, fn: Callable, carry, *, remat_policy=None, unroll: int = 1):
  """Applies `fn(module, carry) -> (carry, out)` for each stacked copy in order (lax.scan).

  Returns the final carry and the per-copy outputs stacked on a leading axis. `remat_policy` is
  None (no rematerialization) or a `jax.checkpoint` policy (`'full'` for no saved values);
  `unroll` copies run per loop iteration (1: compile time independent of the count).
  """
  graphdef, state = nnx.split(stacked)

  def body(c, layer_state):
    return fn(nnx.merge(graphdef, layer_state), c)

  if remat_policy is not None:
    body = jax.checkpoint(body, policy=None if remat_policy == "full" else remat_policy)
  return jax.lax.scan(body, carry, state, unroll=unroll)
