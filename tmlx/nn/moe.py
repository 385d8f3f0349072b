"""Mixture-of-Experts FFN: router → dispatch plan → expert SwiGLU → combine (MODEL_SPEC.md §6).

Dimensions: B batch (each row is one routing group), S sequence, D model, F expert hidden,
E experts, k experts per token, A = k·S routed assignments per row, C capacity per expert and row.

This is the single-device ("local") computation: every expert sees fixed-capacity buffers
[B, E, C, D]; assignments past an expert's capacity are dropped and counted. Within an expert,
earlier choices win: all first choices of a row come before its second choices, then by position.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tmlx import sharding
from tmlx.nn.common import Dtypes, fan_in_init, param


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int
  num_experts_per_tok: int
  num_shared_experts: int
  d_ff: int
  capacity_factor: float
  renormalize: bool


@flax.struct.dataclass
class MoEStats:
  """Router statistics of one call; the aux losses are unweighted (the loss applies the weights)."""

  load_balance_loss: jax.Array  # Switch-style E·Σ f_e·p_e (1.0 when perfectly balanced)
  z_loss: jax.Array  # mean over tokens of logsumexp(router logits)²
  expert_load: jax.Array  # [E] fraction of assignments routed to each expert (before drops)
  dropped: jax.Array  # number of routed assignments dropped for capacity
  assignments: jax.Array  # number of routed assignments (non-padding tokens · k)
  router_entropy: jax.Array  # mean entropy of the router distribution


def capacity(cfg: MoEConfig, seq_len: int) -> int:
  """Slots per expert per row; dropless (≤ 0) means every token fits (C = S)."""
  if cfg.capacity_factor <= 0:
    return seq_len
  c = math.ceil(cfg.capacity_factor * seq_len * cfg.num_experts_per_tok / cfg.num_experts)
  return max(1, min(seq_len, c))


def route(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """fp32 logits [..., E] → (probs [..., E], top-k weights [..., k], top-k expert ids [..., k])."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return probs, weights, experts


@flax.struct.dataclass
class DispatchPlan:
  slot: jax.Array  # [B, A] buffer slot e·C + c of each assignment, E·C if dropped/padding
  token: jax.Array  # [B, E·C] token (position) that fills each slot, S if the slot is empty
  kept: jax.Array  # [B, A] bool


def dispatch_plan(experts: jax.Array, mask: jax.Array, num_experts: int, cap: int) -> DispatchPlan:
  """Top-k expert ids [B, S, k] and token mask [B, S] → where every assignment goes."""
  b, s, k = experts.shape
  # Assignment a = j·S + t: choice j of token t, so first choices sort before second choices.
  eid = jnp.where(mask[:, None, :], experts.transpose(0, 2, 1), num_experts).reshape(b, k * s)

  def one_row(e):
    order = jnp.argsort(e, stable=True)
    counts = jnp.bincount(e, length=num_experts + 1)
    starts = jnp.cumsum(counts) - counts
    pos_sorted = jnp.arange(k * s) - starts[e[order]]
    pos = jnp.zeros_like(pos_sorted).at[order].set(pos_sorted)
    kept = (e < num_experts) & (pos < cap)
    slot = jnp.where(kept, e * cap + pos, num_experts * cap)
    token = jnp.full((num_experts * cap + 1,), s, jnp.int32)
    token = token.at[slot].set(jnp.arange(k * s, dtype=jnp.int32) % s)[:-1]
    return slot, token, kept

  slot, token, kept = jax.vmap(one_row)(eid)
  return DispatchPlan(slot=slot, token=token, kept=kept)


class MoE(nnx.Module):
  """[B, S, D] → ([B, S, D], MoEStats): routed SwiGLU experts plus shared experts."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, rngs: nnx.Rngs, dtypes: Dtypes):
    self.cfg = cfg
    self.dtypes = dtypes
    e, f, pd = cfg.num_experts, cfg.d_ff, dtypes.param
    self.router = param(rngs, fan_in_init(), (d_model, e), ("embed", None), jnp.float32)
    self.w_gate = param(rngs, _expert_init(1), (e, d_model, f), ("expert", "embed", "mlp"), pd)
    self.w_up = param(rngs, _expert_init(1), (e, d_model, f), ("expert", "embed", "mlp"), pd)
    self.w_down = param(rngs, _expert_init(1), (e, f, d_model), ("expert", "mlp", "embed"), pd)
    if cfg.num_shared_experts:
      fs = cfg.num_shared_experts * f
      self.shared_gate = param(rngs, fan_in_init(), (d_model, fs), ("embed", "mlp"), pd)
      self.shared_up = param(rngs, fan_in_init(), (d_model, fs), ("embed", "mlp"), pd)
      self.shared_down = param(rngs, fan_in_init(), (fs, d_model), ("mlp", "embed"), pd)

  def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, MoEStats]:
    cfg, dt = self.cfg, self.dtypes.compute
    b, s, d = x.shape
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    x = x.astype(dt)
    logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), self.router[...])
    probs, weights, experts = route(logits, k, cfg.renormalize)
    cap = capacity(cfg, s)
    plan = dispatch_plan(experts, mask, e, cap)

    # Dispatch: gather each slot's token (the appended zero row fills empty slots).
    x_pad = jnp.concatenate([x, jnp.zeros((b, 1, d), dt)], axis=1)
    buf = jnp.take_along_axis(x_pad, plan.token[..., None], axis=1).reshape(b, e, cap, d)
    buf = sharding.constrain(buf, ("batch", "act_expert", None, "act_embed"))
    h = jax.nn.silu(jnp.einsum("becd,edf->becf", buf, self.w_gate[...].astype(dt)))
    h = h * jnp.einsum("becd,edf->becf", buf, self.w_up[...].astype(dt))
    out = jnp.einsum("becf,efd->becd", h, self.w_down[...].astype(dt))
    out = sharding.constrain(out, ("batch", "act_expert", None, "act_embed"))

    # Combine: gather each assignment's output (dropped → the zero row) and weight it.
    out = jnp.concatenate([out.reshape(b, e * cap, d), jnp.zeros((b, 1, d), dt)], axis=1)
    per_assign = jnp.take_along_axis(out, plan.slot[..., None], axis=1).reshape(b, k, s, d)
    w = weights.transpose(0, 2, 1).astype(dt)  # [B, k, S]
    y = jnp.einsum("bksd,bks->bsd", per_assign, w)
    if cfg.num_shared_experts:
      y = y + swiglu(
        x, self.shared_gate[...].astype(dt), self.shared_up[...].astype(dt), self.shared_down[...].astype(dt)
      )
    return y, router_stats(logits, probs, experts, mask, plan.kept, e)


def _expert_init(fan_in_axis: int):
  """Per-expert fan-in init for [E, in, out] kernels."""

  def init(key, shape, dtype):
    std = shape[fan_in_axis] ** -0.5
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)

  return init


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Dense SwiGLU FFN: [..., D] → [..., D]."""
  h = jax.nn.silu(jnp.einsum("...d,df->...f", x, w_gate)) * jnp.einsum("...d,df->...f", x, w_up)
  return jnp.einsum("...f,fd->...d", h, w_down)


def router_stats(logits, probs, experts, mask, kept, num_experts: int) -> MoEStats:
  """Aux losses and load statistics over the non-padding tokens."""
  m = mask.astype(jnp.float32)
  n_tok = jnp.maximum(jnp.sum(m), 1.0)
  k = experts.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts) * m[..., None, None], axis=(0, 1, 2))
  load = counts / (n_tok * k)
  mean_prob = jnp.sum(probs * m[..., None], axis=(0, 1)) / n_tok
  z = jax.nn.logsumexp(logits, axis=-1)
  entropy = -jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1)
  assignments = jnp.sum(m) * k
  return MoEStats(
    load_balance_loss=num_experts * jnp.sum(load * mean_prob),
    z_loss=jnp.sum(z * z * m) / n_tok,
    expert_load=load,
    dropped=assignments - jnp.sum(kept.astype(jnp.float32)),
    assignments=assignments,
    router_entropy=jnp.sum(entropy * m) / n_tok,
  )
