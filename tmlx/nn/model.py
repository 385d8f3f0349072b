"""InteractionModel: input stems → scanned decoder stack → text and flow heads (MODEL_SPEC.md §2-§6).

Dimensions:
  B  batch
  D  model width
  H  head dim
  K  kv heads
  L  layers
  M  mel channels (80)
  P  video patches of a row
  S  query positions
  T  key positions (KV-cache slots when decoding)
  V  vocabulary
  W  dMel frames per audio position
  Y  flow-target values per position (W·M for the audio head)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Float32, Int, Integer, Shaped

from data_pipelines.contract import NUM_KINDS, NUM_MELS, Kind
from tmlx import fields, sharding
from tmlx.modes import Remat
from tmlx.nn.attention import Attention, KVCache, Rope, attention_mask, resolve_impl, rope_angles
from tmlx.nn.attention import Impl as AttentionImpl
from tmlx.nn.common import Dtypes, RMSNorm, fan_in_init, lookup, param, scan_modules, stack_modules
from tmlx.nn.embed import DmelBagEmbed, HMLPStem, TextEmbed
from tmlx.nn.flow_head import FlowConfig, FlowHead
from tmlx.nn.moe import MoE, MoEConfig, MoEStats

REMAT_POLICIES = dict(zip(get_args(Remat), (None, "full", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)))
ComputeDtype = Literal["float32", "bfloat16", "float16"]
DTYPES = dict(zip(get_args(ComputeDtype), (jnp.float32, jnp.bfloat16, jnp.float16)))

# A packed batch (`data_pipelines.contract`): [B, S] fields, dmel [B, S, W, M], patches
# [B, P, 40, 40, 3] and patch_rowcol [B, P, 2]; the stems check each field's shape.
Batch = dict[str, Shaped[Array, "B ..."]]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters (built from `config.model`)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  attention_window: int
  attention_impl: AttentionImpl
  attention_block: int
  qk_norm: bool
  norm_eps: float
  frames_per_position: int
  stem_width: int
  max_grid_rows: int
  max_grid_cols: int
  tie_embeddings: bool
  param_dtype: Literal["float32", "bfloat16"]
  compute_dtype: ComputeDtype
  remat: Remat
  scan_unroll: int
  moe: MoEConfig
  flow: FlowConfig

  def __post_init__(self):
    fields.literals(self)
    fields.positive(self, "vocab_size", "d_model", "num_layers", "scan_unroll", "num_heads", "num_kv_heads", "head_dim")
    fields.positive(self, "frames_per_position", "attention_block")
    fields.in_range(self, "attention_window", 0)
    if self.attention_impl == "pallas_gpu" and self.attention_window:
      raise fields.FieldError(
        f"@attention_impl='pallas_gpu' has no sliding window, but @attention_window={self.attention_window}: "
        "use 'blockwise', 'cudnn' or 'auto'"
      )
    if self.num_heads % self.num_kv_heads:
      raise fields.FieldError(
        f"@num_heads={self.num_heads} is not divisible by @num_kv_heads={self.num_kv_heads}: grouped-query "
        "attention shares each kv head among a whole number of query heads"
      )
    if self.head_dim % 2:
      raise fields.FieldError(f"@head_dim={self.head_dim}: RoPE needs an even head dimension")

  @classmethod
  def from_config(cls, c: Any) -> ModelConfig:
    """From `config.model` (its moe and flow groups too); a bad value raises fields.FieldError."""
    return fields.build(cls, c)

  @property
  def dtypes(self) -> Dtypes:
    return Dtypes(param=DTYPES[self.param_dtype], compute=DTYPES[self.compute_dtype])

  @property
  def mel_dim(self) -> int:
    """Y = W·M values of one AUDIO_OUT position."""
    return self.frames_per_position * NUM_MELS


@flax.struct.dataclass
class ModelOutput:
  hidden: Float[Array, "B S D"]  # final-normed hidden states
  moe: MoEStats  # per-layer statistics, each leaf with a leading L axis


class Block(nnx.Module):
  """Pre-norm decoder block: x + Attn(Norm(x)), then + MoE(Norm(·))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = cfg.dtypes
    self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs, dtypes=dt, eps=cfg.norm_eps)
    self.attn = Attention(
      cfg.d_model,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      qk_norm=cfg.qk_norm,
      eps=cfg.norm_eps,
      rngs=rngs,
      dtypes=dt,
      impl=cfg.attention_impl,
      window=cfg.attention_window,
      block=cfg.attention_block,
    )
    self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, dtypes=dt, eps=cfg.norm_eps)
    self.moe = MoE(cfg.d_model, cfg.moe, rngs=rngs, dtypes=dt)

  def __call__(
    self,
    x: Float[Array, "B S D"],
    segment_ids: Integer[Array, "B S"],
    mask: Bool[Array, "B S S"] | None,
    rope: Rope,
  ) -> tuple[Float[Array, "B S D"], MoEStats]:
    """`mask` is the row's attention mask where the layer's attention materializes it, else None."""
    x = x + self.attn(self.attn_norm(x), segment_ids, rope, mask)
    token_mask = segment_ids > 0
    y, stats = self.moe(self.mlp_norm(x), token_mask)
    x = sharding.constrain(x + y, ("batch", "act_seq", "act_embed"))
    return x, stats

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
    """The block over new positions that follow the cached ones (`Attention.extend`)."""
    a, cache = self.attn.extend(self.attn_norm(x), rope, cache, start, layer, block=block, window=window)
    x = x + a
    return x + self.moe.decode(self.mlp_norm(x)), cache


class InteractionModel(nnx.Module):
  """The packed batch (`data_pipelines.contract`) → final hidden states and router statistics."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, d = cfg.dtypes, cfg.d_model
    self.text_embed = TextEmbed(cfg.vocab_size, d, rngs=rngs, dtypes=dt)
    self.dmel_embed = DmelBagEmbed(cfg.frames_per_position, d, rngs=rngs, dtypes=dt, eps=cfg.norm_eps)
    width = cfg.stem_width or min(d // 4, 1024)
    self.video_stem = HMLPStem(d, width, cfg.max_grid_rows, cfg.max_grid_cols, rngs=rngs, dtypes=dt, eps=cfg.norm_eps)
    self.kind_embed = param(rngs, fan_in_init(0), (NUM_KINDS, d), (None, "embed"), dt.param)
    self.blocks = stack_modules(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
    self.final_norm = RMSNorm(d, rngs=rngs, dtypes=dt, eps=cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, fan_in_init(), (d, cfg.vocab_size), ("embed", "vocab"), dt.param)
    self.flow_head = FlowHead(d, cfg.mel_dim, cfg.flow, rngs=rngs, dtypes=dt)

  def embed(self, batch: Batch) -> Float[Array, "B S D"]:
    """Input embedding of every position: kind + (text | dMel bag | video patch) [B, S, D]."""
    kind = batch["kind"].astype(jnp.int32)
    x = lookup(self.kind_embed[...], kind, None).astype(self.cfg.dtypes.compute)
    is_text = (kind == Kind.MT) | (kind == Kind.TEXT_IN) | (kind == Kind.TEXT_OUT)
    is_audio = (kind == Kind.AUDIO_IN) | (kind == Kind.AUDIO_OUT)
    x = x + jnp.where(is_text[..., None], self.text_embed(batch["tokens"]), 0)
    x = x + jnp.where(is_audio[..., None], self.dmel_embed(batch["dmel"]), 0)
    patches = self.video_stem(batch["patches"], batch["patch_rowcol"])  # [B, P, D]
    idx = jnp.maximum(batch["patch_index"], 0)[..., None]
    x = x + jnp.where((kind == Kind.PATCH)[..., None], jnp.take_along_axis(patches, idx, axis=1), 0)
    return sharding.constrain(x, ("batch", "act_seq", "act_embed"))

  def __call__(self, batch: Batch) -> ModelOutput:
    """With cfg.attention_window > 0 each position attends to at most that many latest ones
    (itself included), as a streaming session with the same `stream.window` does."""
    cfg = self.cfg
    x = self.embed(batch)
    seg = batch["segment_ids"]
    # Built once for every layer when they materialize it.
    dense = resolve_impl(cfg.attention_impl, sharding.platform(), seg.shape[1], cfg.attention_window) == "dense"
    mask = attention_mask(seg, cfg.attention_window) if dense else None
    rope = rope_angles(batch["positions"], cfg.head_dim, cfg.rope_theta)
    x, stats = scan_modules(
      self.blocks,
      lambda blk, c: blk(c, seg, mask, rope),
      x,
      remat_policy=REMAT_POLICIES[cfg.remat],
      unroll=cfg.scan_unroll,
    )
    return ModelOutput(hidden=self.final_norm(x), moe=stats)

  def empty_cache(self, batch: int, length: int) -> KVCache:
    """A KV cache of T = `length` positions for every layer: k, v [L, B, K, T, H] (compute dtype)."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(jnp.zeros(shape, cfg.dtypes.compute), jnp.zeros(shape, cfg.dtypes.compute))

  def extend(
    self, chunk: Batch, cache: KVCache, start: Int[Array, ""], *, block: int = 512, window: int = 0
  ) -> tuple[Float[Array, "B S D"], KVCache]:
    """Final hidden states [B, S, D] of S new positions (a packed-batch-like dict of [B, S] fields,
    `positions` included, plus `patches` [B, P, 40, 40, 3] and `patch_rowcol`) that follow the
    `start` positions already in `cache`; returns them with the cache extended. The streaming
    session's step: with the same inputs it gives what `__call__` gives at those positions.
    Routing is dropless (`MoE.decode`), so compare with a dropless (capacity_factor ≤ 0) full pass. Attention
    reads the cache `block` slots at a time, up to the last written one; `window` > 0 limits it
    to that many latest positions, with the cache as a ring (`Attention.extend`)."""
    cfg = self.cfg
    x = self.embed(chunk)
    rope = rope_angles(chunk["positions"], cfg.head_dim, cfg.rope_theta)
    graphdef, state = nnx.split(self.blocks)

    def body(carry, layer):
      x, cache = carry
      block_state, i = layer
      x, cache = nnx.merge(graphdef, block_state).extend(x, rope, cache, start, i, block=block, window=window)
      return (x, cache), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(cfg.num_layers)))
    return self.final_norm(x), cache

  def text_logits(self, hidden: Float[Array, "*lead D"]) -> Float32[Array, "*lead V"]:
    """Final hidden states [..., D] → fp32 logits [..., V]."""
    dt = self.cfg.dtypes.compute
    w = self.text_embed.table[...].T if self.cfg.tie_embeddings else self.unembed[...]
    return jnp.einsum("...d,dv->...v", hidden.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def count_parameters(params, cfg: ModelConfig) -> tuple[int, int]:
  """(total, active per token) parameter counts of a (possibly abstract) params tree.

  Active counts everything except the routed experts a token does not visit: attention, router,
  top-k routed and shared experts, embeddings, stems and heads.
  """
  total = routed = 0
  for path, leaf in jax.tree.leaves_with_path(params):
    n = int(leaf.size)
    total += n
    if str(getattr(path[-1], "key", "")) in ROUTED_EXPERT_WEIGHTS:
      routed += n
  unused = routed * (cfg.moe.num_experts - cfg.moe.num_experts_per_tok) // cfg.moe.num_experts
  return total, total - unused
