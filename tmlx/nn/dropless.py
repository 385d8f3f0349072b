"""The dropless expert-parallel MoE transport: exactly the routed tokens over the expert axis.

Dimensions:
  A  routed assignments of a row, J·S (choice j of token s is assignment j·S + s)
  B  batch
  D  model width
  E  experts
  F  expert hidden width
  J  experts chosen per token (top-k)
  R  rows of a flattened matmul: several dimensions folded into one; here assignments sorted by expert
  S  query positions
  X  expert shards: the size of the mesh's expert axis
Inside `jax.shard_map`, lowercase letters are one shard's part: b of B, e = E / X experts.

Each device of the shard_map holds its rows' tokens (a slice of their positions where the tensor
axes would split F) and the whole weights of its e experts. It sorts its assignments by expert
and sends each expert's rows, exactly, to that expert's shard (`ragged_all_to_all`, one slice per
expert); every offset and size comes from one all-gather of the [X, E] counts of each shard's
assignments per expert. A receiving shard lays its buffer out by local expert, each expert's rows
by source, so a grouped matmul over its e experts (`ragged_dot`, or the Pallas megablox kernel on
TPU) runs on the buffer as it lands; the outputs return the way they came. Nothing is dropped:
the receive buffer holds the worst case, every source sending all its assignments (up to
min(J, e) per token) to one shard.

`jax.lax.ragged_all_to_all` has no XLA:CPU implementation; on CPU `emulated_ragged_all_to_all`
performs the same exchange, with the same offsets, through a padded `all_to_all`, so the fake
devices of the tests check every offset and size computed here (its padding makes it a test
device, not a way to train large models on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from tmlx import sharding


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` through a padded `all_to_all`, with its semantics: of the n
  slices given (n a multiple of the axis size X, here n / X = m per shard), slice i (rows
  input_offsets[i] ... + send_sizes[i] of `operand`) goes to shard i // m, which writes it into
  its `output` at output_offsets[i]; received slice i comes from shard i // m with recv_sizes[i]
  rows. Each slice is padded to all of `operand`'s rows on the way (n copies of it: for tests)."""
  n = operand.shape[0]
  rows = jnp.arange(n)
  index = jnp.minimum(input_offsets[:, None] + rows[None], n - 1)
  chunks = jnp.where(
    (rows[None] < send_sizes[:, None]).reshape(*index.shape, *[1] * (operand.ndim - 1)), operand[index], 0
  )
  chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # the senders' offsets here
  dest = jnp.where(rows[None] < recv_sizes[:, None], where[:, None] + rows[None], output.shape[0])
  return output.at[dest.reshape(-1)].set(chunks.reshape(-1, *operand.shape[1:]), mode="drop")


def _grouped(rows, w, sizes, kernel: str):
  """rows [R, D] grouped by expert (sizes [e], then rows past the groups) @ w [e, D, F] → [R, F];
  megablox needs every dimension in whole 128-wide tiles, else ragged_dot runs."""
  if kernel == "ragged_dot":
    return jax.lax.ragged_dot(rows, w, sizes)
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  interpret = kernel == "megablox_interpret"
  m, k = rows.shape
  n = w.shape[-1]
  if m % 128 or k % 128 or n % 128:  # the kernel's tiles (its backward swaps k and n)
    return jax.lax.ragged_dot(rows, w, sizes)
  tiling = (128, 128, 128)
  # The kernel leaves rows past the groups unwritten, forward and backward: zero them both ways.
  valid = (jnp.arange(m) < jnp.sum(sizes))[:, None]
  out = megablox.gmm(jnp.where(valid, rows, 0), w, sizes, rows.dtype, tiling, None, None, False, interpret)
  return jnp.where(valid, out, 0)


def _shard_ffn(x, expert, gate, up, down, *, num_experts, ep_axis, ep, exchange, kernel):
  """One shard: tokens x [b, S, D] (a slice of the positions where the tensor axes split them),
  expert ids [b, J, S] (E for padding), all F of its e experts' weights → per-assignment outputs
  [b, J, S, D]."""
  b, s, d = x.shape
  e = num_experts // ep
  k = expert.shape[1]
  a = k * s
  eid = expert.reshape(-1)
  order = jnp.argsort(eid, stable=True)  # assignments by expert, padding (E) last
  token = (jnp.arange(b)[:, None] * s + jnp.arange(a)[None] % s).reshape(-1)
  sent = x.reshape(b * s, d)[token[order]]  # [b·A, D]
  counts = jnp.bincount(eid, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # [E]

  # One slice per expert: slice g goes to shard g // e. Receivers lay their buffer out by local
  # expert, each expert's rows by source shard, so the grouped matmul runs on it as it lands.
  every = jax.lax.all_gather(counts, ep_axis)  # [X (source), E]
  me = jax.lax.axis_index(ep_axis)
  total = every.sum(0).reshape(ep, e)  # [X, e] rows of each shard's experts
  expert_start = jnp.cumsum(total, axis=1) - total  # [X, e] where each expert's rows start on its shard
  source_start = jnp.cumsum(every, axis=0) - every  # [X, E] where each source's rows start within them
  sent_from = jnp.cumsum(every, axis=1) - every  # [X, E] where each source's rows start in its `sent`

  def mine(a):  # [X, E] → [X, e]: the columns of this shard's experts
    return jax.lax.dynamic_slice_in_dim(a, me * e, e, axis=1)

  input_offsets = sent_from[me]
  output_offsets = expert_start.reshape(-1) + source_start[me]
  recv = mine(every).reshape(-1)  # slice s·e + l: rows of my expert l from source s
  recv_offsets = (expert_start[me][None] + mine(source_start)).reshape(-1)

  capacity = ep * b * s * min(k, e)  # every source sending all it can here (≤ e choices per token)
  capacity = -(-capacity // 128) * 128  # whole tiles of the grouped matmul
  rows = exchange(sent, jnp.zeros((capacity, d), x.dtype), input_offsets, counts, output_offsets, recv)
  sizes = total[me]  # [e]
  h = jax.nn.silu(_grouped(rows, gate, sizes, kernel)) * _grouped(rows, up, sizes, kernel)
  y = _grouped(h, down, sizes, kernel)
  y = jnp.where((jnp.arange(capacity) < jnp.sum(sizes))[:, None], y, 0)  # rows past the groups
  returned = exchange(y, jnp.zeros_like(sent), recv_offsets, recv, mine(sent_from).reshape(-1), counts)
  out = jnp.zeros_like(returned).at[order].set(returned)
  return jnp.where((eid < num_experts)[:, None], out, 0).reshape(b, k, s, d)


def dropless_experts(
  x: Float[Array, "B S D"],
  expert: Int[Array, "B A"],
  gate: Float[Array, "E D F"],
  up: Float[Array, "E D F"],
  down: Float[Array, "E F D"],
) -> Float[Array, "B A D"]:
  """Tokens x [B, S, D] through the experts `expert` [B, A] names (E: a padding token's) → per-
  assignment outputs [B, A, D], over the current mesh's expert axis (module docstring)."""
  mesh, table = sharding.current("the dropless MoE transport")
  b, s, d = x.shape
  ep_axis = sharding.expert_axis(table, "the dropless MoE transport")
  num_experts, ep = gate.shape[0], mesh.shape[ep_axis]
  if ep_axis not in table.get("batch", ()):
    raise ValueError(f"the dropless MoE transport needs the 'batch' rule to include the expert axis {ep_axis!r}")
  batch_axes = sharding.dividing_axes(mesh, table.get("batch", ()), b, keep=(ep_axis,))
  if b % mesh.shape[ep_axis]:
    raise ValueError(
      f"the dropless MoE transport splits the batch over the expert axis {ep_axis!r}: {b} rows do not divide "
      f"into its {mesh.shape[ep_axis]} shards"
    )
  # The tensor axes that split F elsewhere split the positions here, each shard running its slice
  # of the tokens through whole experts (GSPMD gathers their F): no partial sums of every received
  # row, and a receive buffer 1/tensor the size. Positions not divisible by them are not split.
  seq_axes = tuple(a for a in table.get("mlp", ()) if a not in batch_axes and mesh.shape[a] > 1)
  if s % math.prod(mesh.shape[a] for a in seq_axes):
    seq_axes = ()
  platform = sharding.platform()
  exchange = jax.lax.ragged_all_to_all if platform in ("gpu", "tpu") else emulated_ragged_all_to_all
  kernel = "megablox" if platform == "tpu" else "ragged_dot"
  shard = functools.partial(
    _shard_ffn,
    num_experts=num_experts,
    ep_axis=ep_axis,
    ep=ep,
    exchange=functools.partial(exchange, axis_name=ep_axis),
    kernel=kernel,
  )
  seq = seq_axes or None
  out = jax.shard_map(
    shard,
    mesh=mesh,
    in_specs=(
      PartitionSpec(batch_axes, seq, None),
      PartitionSpec(batch_axes, None, seq),
      *(PartitionSpec(ep_axis, None, None),) * 3,
    ),
    out_specs=PartitionSpec(batch_axes, None, seq, None),
    check_vma=False,
  )(x, expert.reshape(b, -1, s), gate, up, down)
  return out.reshape(b, -1, d)


__all__ = ["dropless_experts", "emulated_ragged_all_to_all"]
