"""Mixture-of-Experts FFN in stages: router → dispatch plan → transport + experts → combine.

Dimensions:
  A  routed assignments of a row, J·S (choice j of token s is assignment j·S + s)
  B  batch; each row is one routing group
  C  capacity: buffer slots per expert and row
  D  model width
  E  experts
  F  expert hidden width
  I  input features of a generic layer
  J  experts chosen per token (top-k)
  O  output features of a generic layer
  R  rows of a flattened matmul: several dimensions folded into one; here B·S tokens or an expert's B·C slots
  S  query positions
  X  expert shards: the size of the mesh's expert axis
Inside `jax.shard_map`, lowercase letters are one shard's part: b of B, e = E / X experts.

Within an expert, earlier assignments win: all first choices of a row come before its second
choices, then by position. Assignments past an expert's capacity are dropped (their output is
zero) and counted; padding tokens are never routed.

Transports (MoEConfig.transport) move assignments to their experts and back:
- 'local': capacity buffers [B, E, C, D], one batched matmul per weight over expert-major rows
  [E, R = B·C, D], sharded by GSPMD;
- 'all_to_all': the same buffers exchanged over the mesh's expert axis with
  `jax.lax.all_to_all` inside `jax.shard_map`, each shard computing only its own e experts;
- 'ragged': assignments sorted by expert and a grouped matmul (`jax.lax.ragged_dot`), for
  GPU/TPU; the expert weights are gathered by GSPMD;
- 'dropless': exactly the routed assignments exchanged over the expert axis
  (`jax.lax.ragged_all_to_all`, emulated on CPU) and a grouped matmul per shard
  (`tmlx.nn.dropless`); nothing is dropped, so capacity_factor must be ≤ 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from tmlx import fields, modes, sharding
from tmlx.nn.common import Dtypes, fan_in_init, param
from tmlx.nn.dropless import dropless_experts

Transport = modes.MoETransport
RouterScore = Literal["softmax", "sigmoid"]
TRANSPORTS = get_args(Transport)
ROUTER_SCORES = get_args(RouterScore)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  num_experts: int
  num_experts_per_tok: int
  num_shared_experts: int
  d_ff: int
  capacity_factor: float
  renormalize: bool
  router_score: RouterScore = "softmax"
  transport: Transport = "local"
  # Read by the train step, not by the layer: its routing-bias update, the weights of the router
  # losses, and the dropped fraction it warns at.
  bias_update_rate: float = 0.0
  load_balance_weight: float = 0.01
  z_loss_weight: float = 0.001
  drop_warn_fraction: float = 0.05

  def __post_init__(self):
    fields.literals(self)
    fields.positive(self, "d_ff", "num_experts", "num_experts_per_tok")
    fields.in_range(self, "num_shared_experts", 0)
    for name in ("bias_update_rate", "load_balance_weight", "z_loss_weight"):
      fields.in_range(self, name, 0)
    fields.in_range(self, "drop_warn_fraction", 0.0, 1.0)
    if self.transport == "dropless" and self.capacity_factor > 0:
      raise fields.FieldError(
        f"@transport='dropless' never drops a token, but @capacity_factor={self.capacity_factor} asks for "
        "capacity buffers: set it to 0"
      )
    if self.num_experts_per_tok > self.num_experts:
      raise fields.FieldError(
        f"@num_experts_per_tok={self.num_experts_per_tok} exceeds @num_experts={self.num_experts}"
      )


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias [E]: added to the scores for expert choice only; updated by the
  train step from the observed load (not by gradients)."""


@flax.struct.dataclass
class MoEStats:
  """Router statistics of one call; the aux losses are unweighted (the loss applies the weights)."""

  load_balance_loss: jax.Array  # Switch-style E·Σ f_e·p_e (1.0 when perfectly balanced)
  z_loss: jax.Array  # mean over tokens of logsumexp(router logits)²
  expert_load: jax.Array  # [E] fraction of assignments routed to each expert (before drops)
  dropped: jax.Array  # number of routed assignments dropped for capacity
  assignments: jax.Array  # number of routed assignments (non-padding tokens · J)
  router_entropy: jax.Array  # mean entropy of the normalized router scores


def capacity(cfg: MoEConfig, seq_len: int) -> int:
  """Slots per expert per row; dropless (≤ 0) means every token fits (C = S)."""
  if cfg.capacity_factor <= 0:
    return seq_len
  c = math.ceil(cfg.capacity_factor * seq_len * cfg.num_experts_per_tok / cfg.num_experts)
  return max(1, min(seq_len, c))


# --- Router -------------------------------------------------------------------------------------


@flax.struct.dataclass
class Routing:
  scores: Float[Array, "B S E"]  # fp32 softmax probabilities or sigmoid scores
  weights: Float[Array, "B S J"]  # combine weights of the chosen experts
  experts: Int[Array, "B S J"]  # chosen expert ids


def route(
  logits: Float[Array, "B S E"],
  k: int,
  *,
  score: str = "softmax",
  renormalize: bool = True,
  bias: Float[Array, " E"] | None = None,
) -> Routing:
  """fp32 router logits [B, S, E] → each token's J = k best experts. `bias` [E] shifts the choice, not the weights."""
  logits = logits.astype(jnp.float32)
  if score == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
  elif score == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    raise ValueError(f"router score {score!r}: expected one of {ROUTER_SCORES}")
  choice = scores if bias is None else scores + jax.lax.stop_gradient(bias)
  _, experts = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(scores=scores, weights=weights, experts=experts)


def router_stats(logits, routing: Routing, mask, kept, num_experts: int) -> MoEStats:
  """Aux losses and load statistics over the non-padding tokens."""
  m = mask.astype(jnp.float32)
  n_tok = jnp.maximum(jnp.sum(m), 1.0)
  k = routing.experts.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(routing.experts, num_experts) * m[..., None, None], axis=(0, 1, 2))
  load = counts / (n_tok * k)
  probs = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
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


def balance_bias_update(
  bias: Float[Array, "*lead E"], load: Float[Array, "*lead E"], rate: float
) -> Float[Array, "*lead E"]:
  """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

  bias [..., E], load [..., E] fractions of assignments (summing to 1 over E).
  """
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


# --- Dispatch plan ------------------------------------------------------------------------------


@flax.struct.dataclass
class DispatchPlan:
  expert: Int[Array, "B A"]  # expert of each assignment, E for padding tokens
  slot: Int[Array, "B A"]  # buffer slot e·C + c of each assignment, E·C if dropped or padding
  token: Int[Array, "B _"]  # [B, E·C] token (position) that fills each slot, S if the slot is empty
  kept: Bool[Array, "B A"]


def dispatch_plan(experts: Int[Array, "B S J"], mask: Bool[Array, "B S"], num_experts: int, cap: int) -> DispatchPlan:
  """Top-k expert ids [B, S, J] and token mask [B, S] → where every assignment goes."""
  b, s, k = experts.shape
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
  return DispatchPlan(expert=eid, slot=slot, token=token, kept=kept)


# --- Transport + expert FFN ---------------------------------------------------------------------


@flax.struct.dataclass
class ExpertWeights:
  gate: Float[Array, "E D F"]
  up: Float[Array, "E D F"]
  down: Float[Array, "E F D"]


def swiglu(
  x: Float[Array, "*lead D"], w_gate: Float[Array, "D F"], w_up: Float[Array, "D F"], w_down: Float[Array, "F D"]
) -> Float[Array, "*lead D"]:
  """Dense SwiGLU FFN: [..., D] → [..., D].

  The rows are flattened to one axis R first: XLA:CPU transposes [B, S, ·] activations around
  the weight-gradient matmuls, which took twice as long as the same FLOPs on [R = B·S, ·].
  """
  rows = x.reshape(-1, x.shape[-1])
  h = jax.nn.silu(jnp.einsum("rd,df->rf", rows, w_gate)) * jnp.einsum("rd,df->rf", rows, w_up)
  return jnp.einsum("rf,fd->rd", h, w_down).reshape(*x.shape[:-1], w_down.shape[-1])


def _buffer_ffn(buf: jax.Array, w: ExpertWeights) -> jax.Array:
  """Every expert's SwiGLU on its rows: [E, R, D] → [E, R, D].

  Expert-major with a single row axis R on purpose: with the rows split over two axes (say
  [B, E, C, D]) XLA:CPU transposes the activations around every weight-gradient matmul, which
  made the expert FFN twice as slow as the same FLOPs in [E, R, D].
  """
  h = jax.nn.silu(jnp.einsum("erd,edf->erf", buf, w.gate)) * jnp.einsum("erd,edf->erf", buf, w.up)
  return jnp.einsum("erf,efd->erd", h, w.down)


def _gather_buffers(x: jax.Array, plan: DispatchPlan, num_experts: int) -> jax.Array:
  """x [B, S, D] → capacity buffers [B, E, C, D] (empty slots hold zeros)."""
  b, _, d = x.shape
  x_pad = jnp.concatenate([x, jnp.zeros((b, 1, d), x.dtype)], axis=1)
  buf = jnp.take_along_axis(x_pad, plan.token[..., None], axis=1)
  return buf.reshape(b, num_experts, -1, d)


def _scatter_back(out: jax.Array, plan: DispatchPlan) -> jax.Array:
  """Buffers [B, E, C, D] → per-assignment outputs [B, A, D] (dropped → zeros)."""
  b, e, c, d = out.shape
  out = jnp.concatenate([out.reshape(b, e * c, d), jnp.zeros((b, 1, d), out.dtype)], axis=1)
  return jnp.take_along_axis(out, plan.slot[..., None], axis=1)


def _local(x, plan, w: ExpertWeights) -> jax.Array:
  buf = _gather_buffers(x, plan, w.gate.shape[0])
  buf = sharding.constrain(buf, ("batch", "act_expert", None, "act_embed"))
  b, e, c, d = buf.shape
  out = _buffer_ffn(buf.transpose(1, 0, 2, 3).reshape(e, b * c, d), w)
  out = sharding.constrain(out.reshape(e, b, c, d).transpose(1, 0, 2, 3), ("batch", "act_expert", None, "act_embed"))
  return _scatter_back(out, plan)


def _all_to_all(x, plan, w: ExpertWeights) -> jax.Array:
  mesh, table = sharding.current("the all_to_all MoE transport")
  ep_axis = sharding.expert_axis(table, "the all_to_all MoE transport")
  batch_axes = tuple(a for a in table.get("batch", ()) if mesh.shape[a] > 1) or None
  mlp_axes = tuple(a for a in table.get("mlp", ()) if a != ep_axis and mesh.shape[a] > 1)
  mlp = mlp_axes or None
  num_experts, ep = w.gate.shape[0], mesh.shape[ep_axis]

  def exchange(buf, gate, up, down):
    # buf [b, E, C, D] holds this shard's rows for every expert; weights hold e = E / X experts.
    b, _, c, d = buf.shape
    e = num_experts // ep
    x = buf.reshape(b, ep, e, c, d).transpose(2, 1, 0, 3, 4)  # [e, X (destination shard), b, C, D]
    x = jax.lax.all_to_all(x, ep_axis, 1, 1)  # [e, X (source shard), b, C, D]
    y = _buffer_ffn(x.reshape(e, ep * b * c, d), ExpertWeights(gate, up, down))
    if mlp_axes:
      y = jax.lax.psum(y, mlp_axes)  # F was split over the tensor axes
    y = jax.lax.all_to_all(y.reshape(e, ep, b, c, d), ep_axis, 1, 1)  # [e, X (expert shard), b, C, D]
    return y.transpose(2, 1, 0, 3, 4).reshape(b, num_experts, c, d)

  buf = _gather_buffers(x, plan, num_experts)
  buf_spec = PartitionSpec(batch_axes, None, None, None)
  out = jax.shard_map(
    exchange,
    mesh=mesh,
    in_specs=(
      buf_spec,
      PartitionSpec(ep_axis, None, mlp),
      PartitionSpec(ep_axis, None, mlp),
      PartitionSpec(ep_axis, mlp, None),
    ),
    out_specs=buf_spec,
  )(buf, w.gate, w.up, w.down)
  return _scatter_back(out, plan)


def _ragged(x, plan, w: ExpertWeights) -> jax.Array:
  b, s, d = x.shape
  num_experts = w.gate.shape[0]
  expert = jnp.where(plan.kept, plan.expert, num_experts).reshape(-1)  # dropped sort last
  order = jnp.argsort(expert, stable=True)
  sizes = jnp.bincount(expert, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  rows = (jnp.arange(b)[:, None] * s + jnp.arange(plan.expert.shape[1])[None] % s).reshape(-1)
  xs = x.reshape(b * s, d)[rows[order]]  # [B·A, D] grouped by expert
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
  ys = jax.lax.ragged_dot(h, w.down, sizes)
  ys = jnp.where((expert[order] < num_experts)[:, None], ys, 0)  # rows past the groups
  out = jnp.zeros_like(ys).at[order].set(ys)
  return out.reshape(b, -1, d)


_TRANSPORT_FNS = {"local": _local, "all_to_all": _all_to_all, "ragged": _ragged}


def run_experts(
  transport: str, x: Float[Array, "B S D"], plan: DispatchPlan, w: ExpertWeights
) -> Float[Array, "B A D"]:
  """Tokens x [B, S, D] through their assigned experts → per-assignment outputs [B, A, D]."""
  try:
    fn = _TRANSPORT_FNS[transport]
  except KeyError:
    expected = tuple(_TRANSPORT_FNS)
    raise ValueError(f"MoE transport {transport!r}: expected one of {expected} ('dropless' is MoE's own)") from None
  return fn(x, plan, w)


def combine(per_assignment: Float[Array, "B A D"], weights: Float[Array, "B S J"]) -> Float[Array, "B S D"]:
  """Per-assignment outputs [B, A, D] and router weights [B, S, J] → [B, S, D]."""
  b, s, k = weights.shape
  y = per_assignment.reshape(b, k, s, -1)
  return jnp.einsum("bjsd,bjs->bsd", y, weights.transpose(0, 2, 1).astype(y.dtype))


# --- The layer ----------------------------------------------------------------------------------


def _expert_init(fan_in_axis: int):
  """Per-expert fan-in init for [E, I, O] kernels."""

  def init(key, shape, dtype):
    std = shape[fan_in_axis] ** -0.5
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)

  return init


class MoE(nnx.Module):
  """[B, S, D] → ([B, S, D], MoEStats): routed SwiGLU experts plus shared experts."""

  def __init__(self, d_model: int, cfg: MoEConfig, *, rngs: nnx.Rngs, dtypes: Dtypes):
    self.cfg = cfg
    self.dtypes = dtypes
    e, f, pd = cfg.num_experts, cfg.d_ff, dtypes.param
    self.router = param(rngs, fan_in_init(), (d_model, e), ("embed", None), jnp.float32)
    self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,))
    self.w_gate = param(rngs, _expert_init(1), (e, d_model, f), ("expert", "embed", "mlp"), pd)
    self.w_up = param(rngs, _expert_init(1), (e, d_model, f), ("expert", "embed", "mlp"), pd)
    self.w_down = param(rngs, _expert_init(1), (e, f, d_model), ("expert", "mlp", "embed"), pd)
    if cfg.num_shared_experts:
      fs = cfg.num_shared_experts * f
      self.shared_gate = param(rngs, fan_in_init(), (d_model, fs), ("embed", "mlp"), pd)
      self.shared_up = param(rngs, fan_in_init(), (d_model, fs), ("embed", "mlp"), pd)
      self.shared_down = param(rngs, fan_in_init(), (fs, d_model), ("mlp", "embed"), pd)

  def _route(self, x: jax.Array) -> tuple[jax.Array, Routing]:
    logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), self.router[...])
    cfg = self.cfg
    routing = route(
      logits, cfg.num_experts_per_tok, score=cfg.router_score, renormalize=cfg.renormalize, bias=self.router_bias[...]
    )
    return logits, routing

  def _shared(self, x: jax.Array) -> jax.Array | float:
    if not self.cfg.num_shared_experts:
      return 0.0
    dt = self.dtypes.compute
    return swiglu(x, *(p[...].astype(dt) for p in (self.shared_gate, self.shared_up, self.shared_down)))

  def __call__(self, x: Float[Array, "B S D"], mask: Bool[Array, "B S"]) -> tuple[Float[Array, "B S D"], MoEStats]:
    cfg, dt = self.cfg, self.dtypes.compute
    x = x.astype(dt)
    logits, routing = self._route(x)
    w = ExpertWeights(*(p[...].astype(dt) for p in (self.w_gate, self.w_up, self.w_down)))
    if cfg.transport == "dropless":  # no capacity buffers, so no slot plan
      b, s, k = routing.experts.shape
      expert = jnp.where(mask[:, None, :], routing.experts.transpose(0, 2, 1), cfg.num_experts).reshape(b, k * s)
      per_assignment, kept = dropless_experts(x, expert, w.gate, w.up, w.down), expert < cfg.num_experts
    else:
      plan = dispatch_plan(routing.experts, mask, cfg.num_experts, capacity(cfg, x.shape[1]))
      per_assignment, kept = run_experts(cfg.transport, x, plan, w), plan.kept
    y = combine(per_assignment, routing.weights)
    return y + self._shared(x), router_stats(logits, routing, mask, kept, cfg.num_experts)

  def decode(self, x: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
    """[B, S, D] → [B, S, D] for a few tokens at inference: dropless, with no dispatch. Each
    token's chosen experts' weights are gathered (when the tokens pick fewer than E experts in
    all), or else every expert runs on every token and the unchosen ones get weight 0. A token's
    output depends only on itself, as in a dropless (capacity_factor ≤ 0) full pass."""
    cfg, dt = self.cfg, self.dtypes.compute
    x = x.astype(dt)
    _, routing = self._route(x)
    gate, up, down = (p[...].astype(dt) for p in (self.w_gate, self.w_up, self.w_down))
    b, s, k = routing.experts.shape
    if b * s * k < cfg.num_experts:
      e = routing.experts
      h = jax.nn.silu(jnp.einsum("bsd,bsjdf->bsjf", x, gate[e])) * jnp.einsum("bsd,bsjdf->bsjf", x, up[e])
      y = jnp.einsum("bsjf,bsjfd,bsj->bsd", h, down[e], routing.weights.astype(dt))
    else:
      h = jax.nn.silu(jnp.einsum("bsd,edf->bsef", x, gate)) * jnp.einsum("bsd,edf->bsef", x, up)
      weights = jnp.sum(jax.nn.one_hot(routing.experts, cfg.num_experts, dtype=dt) * routing.weights[..., None], axis=2)
      y = jnp.einsum("bsef,efd,bse->bsd", h, down, weights.astype(dt))
    return y + self._shared(x)


__all__ = [
  "ROUTER_SCORES",
  "TRANSPORTS",
  "DispatchPlan",
  "ExpertWeights",
  "MoE",
  "MoEConfig",
  "MoEStats",
  "RouterBias",
  "Routing",
  "balance_bias_update",
  "capacity",
  "combine",
  "dispatch_plan",
  "route",
  "router_stats",
  "run_experts",
  "swiglu",
]
