"""Grouped-query attention with RoPE and a causal + segment mask (MODEL_SPEC.md §6).

One mask, several implementations (`attend`, chosen by `model.attention_impl`): 'dense'
materializes the logits and the mask [B, S, T] (`dense_attention`); 'blockwise'
(`tmlx.nn.blockwise`) computes them a block at a time, in memory linear in S; 'splash' (TPU),
'pallas_gpu' and 'cudnn' (GPU) are the accelerator kernels of `tmlx.nn.kernels`. 'auto' picks by
the platform of the mesh's devices (`resolve_impl`).

Dimensions:
  B  batch
  D  model width
  G  query heads per kv head, N / K
  H  head dim
  K  kv heads
  L  layers
  N  query heads
  R  rows of a flattened matmul: several dimensions folded into one; here S·G, a kv head's query rows
  S  query positions
  T  key positions (KV-cache slots when decoding)
"""

from __future__ import annotations

from typing import Literal, get_args

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, Integer

from tmlx import sharding
from tmlx.nn import blockwise, kernels
from tmlx.nn.common import Dtypes, RMSNorm, fan_in_init, param

Impl = Literal["auto", "dense", "blockwise", "splash", "pallas_gpu", "cudnn"]
IMPLS = get_args(Impl)
# On CPU, 'auto' materializes rows shorter than this (faster there) and goes blockwise from it on.
CPU_BLOCKWISE_FROM = 1024


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions seen so far, preallocated to a fixed length T."""

  k: Float[Array, "L B K T H"]  # every layer's
  v: Float[Array, "L B K T H"]


# sin and cos of the rotary angles, each [B, S, H/2] (`rope_angles`).
Rope = tuple[Float[Array, "B S _"], Float[Array, "B S _"]]


def attention_mask(segment_ids: Integer[Array, "B S"], window: int = 0) -> Bool[Array, "B S S"]:
  """[B, S] segment ids → [B, S, T] bool with T = S: causal (within `window` positions if > 0),
  same segment, and not padding."""
  s = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  if window:
    causal = jnp.triu(causal, 1 - window)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, :, None] > 0)


def resolve_impl(impl: str, platform: str, seq_len: int, window: int) -> str:
  """The implementation 'auto' stands for on `platform` ('cpu', 'gpu', 'tpu'); others as they are.

  TPU: splash. GPU: the Pallas kernel, or blockwise under a window (which that kernel lacks;
  cuDNN has one but takes packed rows' segments only as a quadratic mask, so it is opt-in). CPU:
  dense below CPU_BLOCKWISE_FROM positions, blockwise from there.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention implementation {impl!r}: expected one of {IMPLS}")
  if impl != "auto":
    return impl
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    return "blockwise" if window else "pallas_gpu"
  return "dense" if seq_len < CPU_BLOCKWISE_FROM else "blockwise"


def dense_attention(
  q: Float[Array, "B S N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], mask: Bool[Array, "B S T"]
) -> Float[Array, "B S N H"]:
  """q [B, S, N, H] over keys/values [B, T, K, H] where mask [B, S, T], logits materialized.

  Laid out for plain batched matmuls: each kv head's G query heads are folded into its query
  rows R ([B, K, R = S·G, H], S major, so a sharded S stays contiguous), and the softmax is
  normalized after the values are summed (one [.., S, G, H] division instead of one over
  [.., S, G, T]). On XLA:CPU this runs the attention of the duplex recipe 2x faster than
  [B, K, G, S, T] logits with a softmax: the logits' layout there costs a transpose per op.
  """
  dt, f32 = q.dtype, jnp.float32
  b, s, n, h = q.shape
  kv, t = k.shape[2], k.shape[1]
  g = n // kv
  q = q.reshape(b, s, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, s * g, h)
  k, v = (jnp.swapaxes(a, 1, 2).astype(dt) for a in (k, v))  # [B, K, T, H]
  logits = jnp.einsum("bkrh,bkth->bkrt", q, k, preferred_element_type=f32).reshape(b, kv, s, g, t) * h**-0.5
  logits = jnp.where(mask[:, None, :, None], logits, jnp.finfo(f32).min)
  top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))  # any shift gives the same softmax
  weights = jnp.exp(logits - top)
  out = jnp.einsum("bkrt,bkth->bkrh", weights.reshape(b, kv, s * g, t).astype(dt), v, preferred_element_type=f32)
  out = out.reshape(b, kv, s, g, h) / weights.sum(-1, keepdims=True)
  return out.astype(dt).transpose(0, 2, 1, 3, 4).reshape(b, s, n, h)


def attend(
  q: Float[Array, "B S N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K H"],
  segment_ids: Integer[Array, "B S"],
  *,
  impl: str = "dense",
  window: int = 0,
  block: int = 512,
  mask: Bool[Array, "B S S"] | None = None,
) -> Float[Array, "B S N H"]:
  """Self-attention of a packed row by the mask of `attention_mask(segment_ids, window)`, with
  `impl` (resolved from 'auto' by the current mesh's platform). Outputs at padding positions
  are unspecified (finite); 'dense' takes `mask` when the caller has built it once already."""
  platform = sharding.platform()
  impl = resolve_impl(impl, platform, q.shape[1], window)
  if impl == "dense":
    return dense_attention(q, k, v, attention_mask(segment_ids, window) if mask is None else mask)
  if impl == "blockwise":
    return blockwise.blockwise_attention(q, k, v, segment_ids, window=window, block=block)
  if impl == "splash":
    return kernels.splash_attention(q, k, v, segment_ids, window=window, block=block, interpret=platform != "tpu")
  if impl == "pallas_gpu":
    return kernels.pallas_gpu_attention(q, k, v, segment_ids, window=window, block=block, interpret=platform != "gpu")
  return kernels.cudnn_attention(q, k, v, segment_ids, window=window)


def rope_angles(positions: Integer[Array, "B S"], head_dim: int, theta: float) -> Rope:
  """[B, S] positions → (sin, cos), each [B, S, H/2] in fp32."""
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(
  x: Float[Array, "B S _ H"], sin: Float[Array, "B S H//2"], cos: Float[Array, "B S H//2"]
) -> Float[Array, "B S _ H"]:
  """Rotates x [B, S, N or K, H] by the angles [B, S, H/2] (half-split layout)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin[:, :, None], cos[:, :, None]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """[B, S, D] → [B, S, D] self-attention over the mask from `attention_mask`."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    qk_norm: bool,
    eps: float,
    rngs: nnx.Rngs,
    dtypes: Dtypes,
    impl: Impl = "dense",
    window: int = 0,
    block: int = 512,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    resolve_impl(impl, "cpu", 0, window)  # a bad name fails here, not at the first call
    self.dtypes = dtypes
    self.num_kv_heads = num_kv_heads
    self.impl, self.window, self.block = impl, window, block
    pd = dtypes.param
    self.wq = param(rngs, fan_in_init(), (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, fan_in_init(), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, fan_in_init(), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, fan_in_init(2), (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), pd)
    self.q_norm = RMSNorm(head_dim, rngs=rngs, dtypes=dtypes, eps=eps) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs, dtypes=dtypes, eps=eps) if qk_norm else None

  def _qkv(self, x: jax.Array, rope: Rope) -> tuple[jax.Array, jax.Array, jax.Array]:
    dt = self.dtypes.compute
    x = x.astype(dt)
    q = jnp.einsum("bsd,dnh->bsnh", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(dt))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return sharding.constrain(q, ("batch", "act_seq", "act_heads", None)), k, v

  def __call__(
    self,
    x: Float[Array, "B S D"],
    segment_ids: Integer[Array, "B S"],
    rope: Rope,
    mask: Bool[Array, "B S S"] | None = None,
  ) -> Float[Array, "B S D"]:
    """Self-attention over a packed row: `attend` with this layer's implementation, window and
    block; `mask` is the row's `attention_mask` where the caller built it for 'dense'."""
    q, k, v = self._qkv(x, rope)
    dt = self.dtypes.compute
    k, v = k.astype(dt), v.astype(dt)
    out = attend(q, k, v, segment_ids, impl=self.impl, window=self.window, block=self.block, mask=mask)
    return jnp.einsum("bsnh,nhd->bsd", out.astype(dt), self.wo[...].astype(dt))

  def extend(
    self,
    x: Float[Array, "B S D"],
    rope: Rope,
    cache: KVCache,
    start: Int[Array, ""],
    layer: Int[Array, ""],
    *,
    block: int = 512,
    window: int = 0,
  ) -> tuple[Float[Array, "B S D"], KVCache]:
    """Attention of S new positions [B, S, D] that follow the `start` positions seen before.

    The cache holds every layer's T slots, [L, B, K, T, H] (each kv head's keys contiguous), of
    which the part of `layer` is updated in place (a loop over layers never copies it). Position
    p lives in slot p mod T: the new keys and values are written there, and nothing before
    `start` is recomputed.

    - `window` 0: every position attends to all positions up to itself, so the caller keeps
      start + S ≤ T.
    - `window` > 0: each attends to the `window` latest positions, itself included;
      T ≥ window + S - 1 keeps every one of those in the ring while a chunk overwrites the oldest
      slots.

    Positions of the chunk past the caller's real ones may be padding: they come after every
    real position, so none attends to them, and the next chunk overwrites them. Only written
    slots are read: a loop over `block`-slot slices up to the last one written (its trip count
    is traced, so one program serves every length) with an online softmax, so a step costs
    what the context holds, not what the cache could.
    """
    q, k, v = self._qkv(x, rope)
    b, s, n, h = q.shape
    kv, t = self.num_kv_heads, cache.k.shape[-2]
    block = min(block, t)
    if t % block:
      raise ValueError(f"KV cache length {t} is not a multiple of the attention block {block}")
    if window and t < window + s - 1:
      raise ValueError(f"KV cache length {t} < window {window} + chunk {s} - 1: the ring would drop needed positions")
    k, v = (a.astype(cache.k.dtype) for a in (k, v))  # [B, S, K, H]
    slots = (start + jnp.arange(s)) % t
    # Index [layer, :, :, slots] puts the S axis first: [S, B, K, H].
    keys, values = (c.at[layer, :, :, slots].set(jnp.swapaxes(a, 0, 1)) for c, a in ((cache.k, k), (cache.v, v)))
    dt = self.dtypes.compute
    g = n // kv
    q = q.reshape(b, s, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, s * g, h)  # [B, K, S·G, H]
    end = start + s  # positions written so far
    query = start + jnp.arange(s)  # [S] the new positions
    zero = jnp.zeros((), jnp.int32)

    def read(c, i):  # [B, K, block, H]: slots of block i of this layer's keys or values
      return jax.lax.dynamic_slice(c, (layer, zero, zero, i * block, zero), (1, b, kv, block, h))[0].astype(dt)

    def attend(i, carry):
      slot = i * block + jnp.arange(block)
      held = slot + (end - 1 - slot) // t * t  # the latest position written to each slot (< 0: none yet)
      seen = (held >= 0) & (held <= query[:, None])  # [S, block]
      if window:
        seen &= held > query[:, None] - window
      return blockwise.online_step(carry, q, read(keys, i), read(values, i), seen[None, None, :, None], h**-0.5)

    count = jnp.minimum((end + block - 1) // block, t // block)
    _, total, acc = jax.lax.fori_loop(0, count, attend, blockwise.empty_softmax(b, kv, s, g, h))
    out = (acc / total[..., None]).astype(dt)  # [B, K, S, G, H]
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, s, n, h)
    return jnp.einsum("bsnh,nhd->bsd", out, self.wo[...].astype(dt)), KVCache(keys, values)
