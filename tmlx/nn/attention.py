"""Grouped-query attention with RoPE and a causal + segment mask (MODEL_SPEC.md §6).

Dimensions: B batch, S query positions, T key positions, D model, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tmlx import sharding
from tmlx.nn.common import Dtypes, RMSNorm, fan_in_init, param


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions seen so far, preallocated to a fixed length T."""

  k: jax.Array  # [B, K, T, H] (a leading L when stacked over layers)
  v: jax.Array


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, S] segment ids → [B, S, T] bool: causal, same segment, and not padding."""
  s = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, :, None] > 0)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """[B, S] positions → (sin, cos), each [B, S, H/2] in fp32."""
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freq
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates x [B, S, heads, H] by the angles [B, S, H/2] (half-split layout)."""
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
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    self.dtypes = dtypes
    self.num_kv_heads = num_kv_heads
    pd = dtypes.param
    self.wq = param(rngs, fan_in_init(), (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, fan_in_init(), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, fan_in_init(), (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, fan_in_init(2), (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"), pd)
    self.q_norm = RMSNorm(head_dim, rngs=rngs, dtypes=dtypes, eps=eps) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, rngs=rngs, dtypes=dtypes, eps=eps) if qk_norm else None

  def _qkv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    dt = self.dtypes.compute
    x = x.astype(dt)
    q = jnp.einsum("bsd,dnh->bsnh", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x, self.wv[...].astype(dt))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return sharding.constrain(q, ("batch", "act_seq", "act_heads", None)), k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, S, N, H] over keys/values [B, T, K, H] where mask [B, S, T] → [B, S, D]."""
    dt = self.dtypes.compute
    b, s, n, h = q.shape
    q = q.reshape(b, s, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("bskgh,btkh->bkgst", q, k, preferred_element_type=jnp.float32) * h**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgst,btkh->bskgh", probs, v.astype(dt)).reshape(b, s, n, h)
    return jnp.einsum("bsnh,nhd->bsd", out, self.wo[...].astype(dt))

  def __call__(self, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    q, k, v = self._qkv(x, rope)
    return self._attend(q, k, v, mask)

  def extend(
    self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: KVCache, start: jax.Array, layer=None
  ) -> tuple[jax.Array, KVCache]:
    """Attention of S new positions [B, S, D] that follow the `start` positions held in `cache`.

    Their keys and values are written into the cache at start..start+S-1 and every new position
    attends to the cache up to itself; nothing before `start` is recomputed. Positions of the
    chunk past the caller's real ones may be padding: their entries sit beyond the causal
    horizon of every real position and are overwritten by the next chunk. The cache is laid out
    [B, K, T, H] (each kv head's keys contiguous) or, with `layer`, [L, B, K, T, H] for every
    layer, of which this layer's part is updated in place (a loop over layers never copies it).
    """
    q, k, v = self._qkv(x, rope)
    k, v = (jnp.swapaxes(a, 1, 2).astype(cache.k.dtype) for a in (k, v))  # [B, K, S, H]
    zero = jnp.zeros((), jnp.int32)
    if layer is None:
      at = (zero, zero, start, zero)
      keys, values = (jax.lax.dynamic_update_slice(c, a, at) for c, a in ((cache.k, k), (cache.v, v)))
      layer_k, layer_v = keys, values
    else:
      at = (layer, zero, zero, start, zero)
      keys, values = (jax.lax.dynamic_update_slice(c, a[None], at) for c, a in ((cache.k, k), (cache.v, v)))
      layer_k, layer_v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (keys, values))
    dt = self.dtypes.compute
    b, s, n, h = q.shape
    t = layer_k.shape[2]
    q = q.reshape(b, s, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("bskgh,bkth->bkgst", q, layer_k.astype(dt), preferred_element_type=jnp.float32) * h**-0.5
    mask = jnp.arange(t)[None, :] <= start + jnp.arange(s)[:, None]  # [S, T]: causal over the cache
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgst,bkth->bskgh", probs, layer_v.astype(dt)).reshape(b, s, n, h)
    return jnp.einsum("bsnh,nhd->bsd", out, self.wo[...].astype(dt)), KVCache(keys, values)
