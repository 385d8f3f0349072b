"""Accelerator attention kernels behind the mask of `tmlx.nn.attention.attention_mask`.

Dimensions:
  B  batch
  G  query heads per kv head, N / K
  H  head dim
  K  kv heads
  N  query heads
  S  query positions
Inside `jax.shard_map`, lowercase letters are one shard's part: b of B, n of N, k of K.

- 'splash' (TPU): the Pallas splash-attention kernel, one MQA kernel per kv head (its G query
  heads share the keys), with the segment ids of packed rows and a causal or local (window) mask
  whose fully masked blocks it skips. Off TPU it runs in Pallas interpret mode (the tests).
- 'pallas_gpu' (GPU): the Pallas (Triton) flash-attention kernel, with segment ids and the causal
  mask; it has no sliding window, and no grouped heads (the kv heads are repeated to N). Off GPU
  it runs in interpret mode.
- 'cudnn' (GPU): `jax.nn.dot_product_attention` with the cuDNN implementation, which covers the
  causal mask and the window itself but not segment ids: packed rows reach it as a boolean mask
  [B, 1, S, S] that it turns into a bias, so that part of its memory is quadratic in S. It needs
  a GPU with cuDNN (no interpret mode; the tests run the same call with the XLA implementation).

Each padding position (segment 0) of 'splash' and 'pallas_gpu' attends to the padding before it,
'cudnn' likewise; what they return there is finite and read by nothing (no real position
attends to padding, and the losses skip it).

Under `tmlx.sharding.use_mesh_rules` the Pallas kernels run inside `jax.shard_map`, each device on
its rows (the 'batch' rule's axes) and query heads (the 'act_heads' rule's axis), the whole
sequence at once; a kv head shared by query heads on several devices is replicated to them (and
where a device's query heads would span kv heads, the kv heads are repeated to one per query
head). Rows are padded to whole kernel blocks as segment 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Integer

from tmlx import sharding

# The largest query and key block of the Pallas GPU kernel (its shared memory bounds it).
PALLAS_GPU_MAX_BLOCK = 128


@functools.cache
def _splash_kernel(length: int, heads: int, window: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (length, length)
  one = splash.LocalMask(shape, (window - 1, 0), 0) if window else splash.CausalMask(shape)
  b = min(block, length)
  sizes = splash.BlockSizes(
    block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
    use_fused_bwd_kernel=True,
  )  # fmt: skip
  with jax.ensure_compile_time_eval():  # concrete mask tables, so the cached kernel holds no tracer
    return splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([one] * heads), block_sizes=sizes, interpret=interpret
    )


def _splash_local(q, k, v, seg, *, window: int, block: int, interpret: bool):
  """One shard: q [b, S, n, H], k, v [b, S, k, H], seg [b, S] → [b, S, n, H]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  b, s, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  kernel = _splash_kernel(s, g, window, block, interpret)
  q = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype)  # the kernel does not scale
  q = q.reshape(b, s, kv, g, h).transpose(0, 2, 3, 1, 4)  # [b, k, G, S, H]
  k, v = (a.transpose(0, 2, 1, 3) for a in (k, v))  # [b, k, S, H]

  def one_row(q, k, v, seg):
    ids = SegmentIds(seg, seg)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

  out = jax.vmap(one_row)(q, k, v, seg)  # [b, k, G, S, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def _pallas_gpu_local(q, k, v, seg, *, window: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  if window:
    raise ValueError(f"attention 'pallas_gpu' has no sliding window (model.attention_window={window})")
  b, s, n, h = q.shape
  g = n // k.shape[2]
  k, v = (jnp.repeat(a, g, axis=2) for a in (k, v))
  bq = min(block, PALLAS_GPU_MAX_BLOCK, s)  # s is a multiple of it (`_padded`)
  sizes = gpu_attention.BlockSizes(
    block_q=bq, block_k=bq, block_q_dkv=min(bq, 64), block_kv_dkv=min(bq, 64), block_q_dq=min(bq, 64),
    block_kv_dq=min(bq, 64),
  )  # fmt: skip
  return gpu_attention.mha(q, k, v, seg, sm_scale=h**-0.5, causal=True, block_sizes=sizes, interpret=interpret)


def _padded(local: Callable, multiple: Callable[[int], int]) -> Callable:
  """`local` on rows padded (as segment 0, after every real position) to a multiple of
  `multiple(S)` positions, the kernels' blocks; outputs cut back to S."""

  def run(q, k, v, seg):
    s = q.shape[1]
    m = multiple(s)
    pad = -s % m
    if pad:
      q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
      seg = jnp.pad(seg, ((0, 0), (0, pad)))
    return local(q, k, v, seg)[:, :s]

  return run


def _sharded(local: Callable, q, k, v, seg):
  """Runs `local` per device under the current mesh rules (module docstring), else as it is."""
  ctx = sharding.current_or_none()
  if ctx is None:
    return local(q, k, v, seg)
  mesh, table = ctx
  b, _, n, _ = q.shape
  kv = k.shape[2]
  rows = sharding.dividing_axes(mesh, table.get("batch", ()), b)
  heads = tuple(a for a in table.get("act_heads", ()) if mesh.shape[a] > 1)
  tp = math.prod(mesh.shape[a] for a in heads)
  if n % tp:
    heads, tp = (), 1
  row_spec = rows or None
  q_spec = PartitionSpec(row_spec, None, heads or None, None)
  if kv % tp and tp % kv:  # a shard's query heads would span kv heads: give each its own
    k, v = (jnp.repeat(a, n // kv, axis=2) for a in (k, v))
    kv = n
  if kv % tp == 0:
    kv_spec, fn = PartitionSpec(row_spec, None, heads or None, None), local
  else:  # fewer kv heads than head shards: each shard takes the one its query heads share
    kv_spec = PartitionSpec(row_spec, None, None, None)
    g, per_shard = n // kv, n // tp

    def fn(q, k, v, seg):
      index = 0
      for axis in heads:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
      head = index * per_shard // g
      pick = lambda a: jax.lax.dynamic_slice_in_dim(a, head, 1, axis=2)  # noqa: E731
      return local(q, pick(k), pick(v), seg)

  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(row_spec, None)),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, seg)


def splash_attention(
  q: Float[Array, "B S N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K H"],
  segment_ids: Integer[Array, "B S"],
  *,
  window: int = 0,
  block: int = 512,
  interpret: bool = False,
) -> Float[Array, "B S N H"]:
  """The TPU splash kernel over the causal (or `window`) mask of packed rows (module docstring)."""
  local = functools.partial(_splash_local, window=window, block=block, interpret=interpret)
  # Blocks of `block` positions, or the row rounded up to whole 128-lane tiles when it is shorter.
  return _sharded(_padded(local, lambda s: min(block, -(-s // 128) * 128)), q, k, v, segment_ids)


def pallas_gpu_attention(
  q: Float[Array, "B S N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K H"],
  segment_ids: Integer[Array, "B S"],
  *,
  window: int = 0,
  block: int = PALLAS_GPU_MAX_BLOCK,
  interpret: bool = False,
) -> Float[Array, "B S N H"]:
  """The Pallas GPU flash kernel over the causal mask of packed rows (no window)."""
  local = functools.partial(_pallas_gpu_local, window=window, block=block, interpret=interpret)
  return _sharded(_padded(local, lambda s: min(block, PALLAS_GPU_MAX_BLOCK, -(-s // 16) * 16)), q, k, v, segment_ids)


def cudnn_attention(
  q: Float[Array, "B S N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K H"],
  segment_ids: Integer[Array, "B S"],
  *,
  window: int = 0,
  implementation: str = "cudnn",
) -> Float[Array, "B S N H"]:
  """`jax.nn.dot_product_attention` (cuDNN) with the causal mask, the window and, as a boolean
  mask, the segments of packed rows; `implementation='xla'` runs the same call anywhere."""
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=same,
    is_causal=True,
    local_window_size=(window - 1, 0) if window else None,
    implementation=implementation,
  )


__all__ = ["PALLAS_GPU_MAX_BLOCK", "cudnn_attention", "pallas_gpu_attention", "splash_attention"]
