"""Blockwise (flash-style) attention in pure JAX, with a custom VJP: memory linear in the length.

Dimensions:
  B  batch
  G  query heads per kv head, N / K
  H  head dim
  K  kv heads
  N  query heads
  R  rows of a flattened matmul: several dimensions folded into one; here S·G, a kv head's query rows
  S  query positions
  T  key positions (KV-cache slots when decoding)

The mask is the one of `tmlx.nn.attention.attention_mask`, computed a block at a time from the
segment ids instead of materialized: query p attends to key j ≤ p of its own segment (within the
`window` latest positions when window > 0), and padding (segment 0) attends to nothing.

The row is cut into blocks of `block` positions. Only the (query block, key block) pairs that the
causal and window masks do not rule out are visited, in one scan over a schedule fixed at trace
time (`schedule`): a causal row of n blocks visits n(n+1)/2 pairs, a windowed one about
n·(window/block + 1). Each visit folds one key block into its query block's running softmax
(`online_step`, the same update `Attention.extend` streams the KV cache with). What is kept for
the backward pass is q, k, v, the output and one log-sum-exp per query row; the backward scan
recomputes each visited block's probabilities from them (flash attention's recipe). Outputs at
padding positions are zeros, with zero gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer

# The logit of a masked pair: the most negative finite fp32, so that max and exp stay finite.
MASKED = float(jnp.finfo(jnp.float32).min)

# Running softmax of query rows: the max logit and the sum of exp(logit - max) [B, K, S, G], and
# the sum of exp(logit - max)·v [B, K, S, G, H], all fp32.
Softmax = tuple[jax.Array, jax.Array, jax.Array]


def online_step(
  carry: Softmax,
  q: Float[Array, "B K R H"],
  k: Float[Array, "B K T H"],
  v: Float[Array, "B K T H"],
  mask: Bool[Array, "#B #K S #G T"],
  scale: float,
) -> Softmax:
  """Folds the keys and values of one block [B, K, T, H] into the running softmax `carry` of the
  query rows q [B, K, R = S·G, H], where `mask` allows; logits are fp32, times `scale`."""
  top, total, acc = carry
  b, kv, s, g = top.shape
  logits = jnp.einsum("bkrh,bkth->bkrt", q, k, preferred_element_type=jnp.float32).reshape(b, kv, s, g, -1) * scale
  logits = jnp.where(mask, logits, MASKED)
  new_top = jnp.maximum(top, logits.max(-1))
  probs = jnp.where(mask, jnp.exp(logits - new_top[..., None]), 0.0)
  rescale = jnp.exp(top - new_top)
  pv = jnp.einsum(
    "bkrt,bkth->bkrh", probs.reshape(b, kv, s * g, -1).astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  return new_top, total * rescale + probs.sum(-1), acc * rescale[..., None] + pv.reshape(acc.shape)


def empty_softmax(b: int, kv: int, s: int, g: int, h: int) -> Softmax:
  """The running softmax of rows that have seen no key yet."""
  f32 = jnp.float32
  return jnp.full((b, kv, s, g), MASKED, f32), jnp.zeros((b, kv, s, g), f32), jnp.zeros((b, kv, s, g, h), f32)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The visited (query block, key block) pairs of a row of `length` positions, in query-block
  order and, within one, in key-block order (the last visit of a query block completes it)."""

  length: int  # positions, a multiple of block
  block: int
  window: int
  query_blocks: tuple[int, ...]
  key_blocks: tuple[int, ...]

  @property
  def num_blocks(self) -> int:
    return self.length // self.block

  @property
  def first(self) -> tuple[bool, ...]:
    """Whether each visit is the first of its query block (the running softmax restarts)."""
    return tuple(p == 0 or self.query_blocks[p - 1] != i for p, i in enumerate(self.query_blocks))


@functools.cache
def schedule(length: int, block: int, window: int = 0) -> Schedule:
  """The pairs the causal mask (and the `window` latest positions, if > 0) leave any key in."""
  if length % block:
    raise ValueError(f"blockwise attention: length {length} is not a multiple of the block {block}")
  queries, keys = [], []
  for i in range(length // block):
    first, last = i * block, (i + 1) * block - 1  # query positions of block i
    lo = max(0, first - window + 1) // block if window else 0
    for j in range(lo, last // block + 1):
      queries.append(i)
      keys.append(j)
  return Schedule(length, block, window, tuple(queries), tuple(keys))


def _layout(length: int, block: int) -> tuple[int, int]:
  """(block, padded length) of a row of `length` positions: blocks no longer than the row, which
  is padded to a whole number of them."""
  block = min(block, length)
  return block, -(-length // block) * block


def visited_keys_per_query(length: int, block: int, window: int = 0) -> float:
  """Keys whose logits blockwise attention computes, per query position (for tmlx.flops)."""
  block, padded = _layout(length, block)
  return len(schedule(padded, block, window).query_blocks) * block * block / length


def _block_mask(sched: Schedule, i, j, seg_q, seg_k) -> jax.Array:
  """The mask of query block i against key block j: [B, 1, S, 1, T] over one block each."""
  qpos = i * sched.block + jnp.arange(sched.block)
  kpos = j * sched.block + jnp.arange(sched.block)
  allowed = kpos[None, :] <= qpos[:, None]
  if sched.window:
    allowed &= qpos[:, None] - kpos[None, :] < sched.window
  same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)
  return (allowed[None] & same)[:, None, :, None, :]


def _visits(sched: Schedule):
  return (
    jnp.asarray(np.array(sched.query_blocks, np.int32)),
    jnp.asarray(np.array(sched.key_blocks, np.int32)),
    jnp.asarray(np.array(sched.first, bool)),
  )


def _forward(sched: Schedule, unroll, q, k, v, seg):
  """Blocked inputs → blocked outputs: q [B, K, R, H] per query block (a leading block axis),
  k, v [B, K, T, H] per key block, seg per block; returns out (q's dtype) and the fp32 log-sum-exp."""
  nb, b, kv, r, h = q.shape
  g, scale = r // sched.block, h**-0.5
  state0 = empty_softmax(b, kv, sched.block, g, h)
  out0 = jnp.zeros((nb, b, kv, sched.block, g, h), q.dtype)
  lse0 = jnp.zeros((nb, b, kv, sched.block, g), jnp.float32)

  def visit(carry, x):
    state, out, lse = carry
    i, j, first = x
    state = jax.tree.map(lambda a, z: jnp.where(first, z, a), state, state0)
    state = online_step(state, q[i], k[j], v[j], _block_mask(sched, i, j, seg[i], seg[j]), scale)
    top, total, acc = state
    seen = total > 0
    out = out.at[i].set((acc / jnp.where(seen, total, 1.0)[..., None]).astype(out.dtype))
    lse = lse.at[i].set(jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), 0.0))
    return (state, out, lse), None

  (_, out, lse), _ = jax.lax.scan(visit, (state0, out0, lse0), _visits(sched), unroll=unroll)
  return out, lse


def _backward(sched: Schedule, unroll, q, k, v, seg, out, lse, dout):
  nb, b, kv, r, h = q.shape
  g, scale, f32 = r // sched.block, h**-0.5, jnp.float32
  delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)  # [B, K, S, G] per query block
  dout = dout.reshape(nb, b, kv, r, h)
  grads0 = (jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))

  def visit(grads, x):
    dq, dk, dv = grads
    i, j, _ = x
    qi, kj, vj, doi = q[i], k[j], v[j], dout[i]
    mask = _block_mask(sched, i, j, seg[i], seg[j])
    logits = (
      jnp.einsum("bkrh,bkth->bkrt", qi, kj, preferred_element_type=f32).reshape(b, kv, sched.block, g, -1) * scale
    )
    probs = jnp.where(mask, jnp.exp(logits - lse[i][..., None]), 0.0)
    dprobs = jnp.einsum("bkrh,bkth->bkrt", doi, vj, preferred_element_type=f32).reshape(probs.shape)
    dlogits = (probs * (dprobs - delta[i][..., None]) * scale).reshape(b, kv, r, -1).astype(qi.dtype)
    probs = probs.reshape(b, kv, r, -1).astype(doi.dtype)
    dv = dv.at[j].add(jnp.einsum("bkrt,bkrh->bkth", probs, doi, preferred_element_type=f32))
    dq = dq.at[i].add(jnp.einsum("bkrt,bkth->bkrh", dlogits, kj, preferred_element_type=f32))
    dk = dk.at[j].add(jnp.einsum("bkrt,bkrh->bkth", dlogits, qi, preferred_element_type=f32))
    return (dq, dk, dv), None

  (dq, dk, dv), _ = jax.lax.scan(visit, grads0, _visits(sched), unroll=unroll)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked(sched, unroll, q, k, v, seg):
  return _forward(sched, unroll, q, k, v, seg)[0]


def _blocked_fwd(sched, unroll, q, k, v, seg):
  out, lse = _forward(sched, unroll, q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _blocked_bwd(sched, unroll, res, dout):
  q, k, v, seg, out, lse = res
  return (*_backward(sched, unroll, q, k, v, seg, out, lse, dout), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blockwise_attention(
  q: Float[Array, "B S N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K H"],
  segment_ids: Integer[Array, "B S"],
  *,
  window: int = 0,
  block: int = 512,
  unroll: int | bool = 1,
) -> Float[Array, "B S N H"]:
  """Self-attention of q [B, S, N, H] over k, v [B, S, K, H] (module docstring's mask), logits
  scaled by H^-0.5, in blocks of `block` positions (a row not a multiple of it is padded, as segment 0).
  `unroll` unrolls the scans over the schedule (True: fully, so that XLA's cost analysis sees
  every visit)."""
  b, s, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  block, padded = _layout(s, block)
  if padded != s:
    pad = ((0, 0), (0, padded - s), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - s)))
  sched = schedule(padded, block, window)
  nb = sched.num_blocks
  # [B, S, N, H] → per query block [B, K, S·G, H] (S major, so each block's rows are contiguous).
  qb = q.reshape(b, nb, block, kv, g, h).transpose(1, 0, 3, 2, 4, 5).reshape(nb, b, kv, block * g, h)
  kb, vb = (a.reshape(b, nb, block, kv, h).transpose(1, 0, 3, 2, 4) for a in (k, v))
  seg = segment_ids.reshape(b, nb, block).swapaxes(0, 1)
  out = _blocked(sched, unroll, qb, kb, vb, seg)  # per query block [B, K, S, G, H]
  out = out.transpose(1, 0, 3, 2, 4, 5).reshape(b, padded, n, h)
  return out[:, :s]


__all__ = [
  "MASKED",
  "Schedule",
  "blockwise_attention",
  "empty_softmax",
  "online_step",
  "schedule",
  "visited_keys_per_query",
]
