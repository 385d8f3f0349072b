"""Training losses of the interaction model (MODEL_SPEC.md §4).

The hidden state at position p predicts position p+1. Targets are gathered first (up to a static
number per row), so logits and flow-head passes run only where there is something to predict.

Dimensions in the letters of `tmlx.nn.dims` (B batch, S positions, D model width, V vocabulary,
W dMel frames per audio position, M mel channels); the gathered targets of a row, a static count
set by the config, are named in full: `text` (LossConfig.max_text_targets) and `audio`
(LossConfig.max_audio_targets).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from data_pipelines.contract import Kind, special_id
from tmlx import fields
from tmlx.nn.flow_head import flow_matching_loss
from tmlx.nn.model import InteractionModel, ModelOutput


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """`config.loss` (experiments/base.py says what each field does); `loss_config` turns it into
  the train step's LossConfig."""

  text_weight: float
  flow_weight: float
  silent_eot_weight: float
  burn_in_micro_turns: int
  max_text_target_fraction: float
  max_audio_target_fraction: float

  def __post_init__(self):
    for name in ("text_weight", "flow_weight", "silent_eot_weight"):
      fields.in_range(self, name, 0)
    if self.burn_in_micro_turns < 0:
      raise fields.FieldError(f"@burn_in_micro_turns={self.burn_in_micro_turns}: must be >= 0")
    for name in ("max_text_target_fraction", "max_audio_target_fraction"):
      fields.in_range(self, name, 0.0, 1.0)

  @classmethod
  def from_config(cls, loss: ml_collections.ConfigDict) -> LossSettings:
    return fields.build(cls, loss)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the train step's losses need: `config.loss` with the target counts it sets per row, and
  the router losses' weights of `config.model.moe`."""

  text_weight: float
  flow_weight: float
  silent_eot_weight: float
  max_text_targets: int  # text targets gathered per row
  max_audio_targets: int  # audio targets gathered per row
  load_balance_weight: float
  z_loss_weight: float
  eot_id: int
  burn_in: int = 0  # micro-turns of a window that starts mid-conversation with no output loss


def target_slots(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(text, audio): the static number of text and audio targets gathered per row of `config.data.seq_len`
  positions, `config.loss.max_*_target_fraction` of them, rounded up, at least one."""
  s, c = config.data.seq_len, config.loss
  return max(1, math.ceil(s * c.max_text_target_fraction)), max(1, math.ceil(s * c.max_audio_target_fraction))


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """The LossConfig of an experiment config (its loss and model.moe fields)."""
  c = LossSettings.from_config(config.loss)
  max_text, max_audio = target_slots(config)
  return LossConfig(
    text_weight=c.text_weight,
    flow_weight=c.flow_weight,
    silent_eot_weight=c.silent_eot_weight,
    max_text_targets=max_text,
    max_audio_targets=max_audio,
    load_balance_weight=config.model.moe.load_balance_weight,
    z_loss_weight=config.model.moe.z_loss_weight,
    eot_id=special_id("<eot>"),
    burn_in=c.burn_in_micro_turns,
  )


@flax.struct.dataclass
class LossSums:
  """Sums and counts, so that micro-batches add up to the full batch exactly."""

  text_sum: jax.Array  # weighted cross-entropy summed over text targets
  text_weight: jax.Array  # summed target weights
  flow_sum: jax.Array
  flow_count: jax.Array
  text_overflow: jax.Array  # text targets past the static bound (not trained on)
  audio_overflow: jax.Array


def shift_left(x: jax.Array) -> jax.Array:
  """x[:, p] ← x[:, p+1] (what position p predicts); the last position gets zeros (PAD, no segment)."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def next_position_targets(kind: jax.Array, segment_ids: jax.Array, target_kind: Kind) -> jax.Array:
  """[B, S] bool: position p whose successor p+1 is a `target_kind` in the same segment."""
  return (shift_left(kind) == target_kind) & (shift_left(segment_ids) == segment_ids) & (segment_ids > 0)


def knowable(batch: dict, burn_in: int) -> jax.Array:
  """[B, S] bool: positions whose content the model can know from its window.

  A window cut from the middle of a conversation starts without what came before it: in its first
  micro-turns the model cannot know what it was saying (a word? which?), and a loss there teaches
  it to babble from nothing, which a live session, always starting at a conversation's beginning,
  then does. The first `burn_in` micro-turns of such a window are context only; a window that
  starts at a conversation's first micro-turn (micro_turn 0) is trained on from its start.
  """
  if burn_in <= 0:
    return jnp.ones(batch["kind"].shape, bool)
  mt, positions = batch["micro_turn"], batch["positions"]
  first = jnp.take_along_axis(mt, jnp.maximum(jnp.arange(mt.shape[1])[None] - positions, 0), axis=1)
  return (first == 0) | (mt - first >= burn_in)


def _first_n(mask: jax.Array, n: int) -> jax.Array:
  """Keeps the first n True positions of each row of mask [B, S]."""
  return mask & (jnp.cumsum(mask, axis=1) <= n)


def text_target_weights(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(weights [B, S] of each position's text target, 0 where none; overflow count [])."""
  kind, seg = batch["kind"].astype(jnp.int32), batch["segment_ids"]
  is_text = next_position_targets(kind, seg, Kind.TEXT_OUT) & shift_left(knowable(batch, cfg.burn_in))
  kept = _first_n(is_text, cfg.max_text_targets)
  # An <eot> right after a non-text position ends a silent micro-turn.
  silent = (shift_left(batch["tokens"]) == cfg.eot_id) & (kind != Kind.TEXT_OUT)
  weights = kept * jnp.where(silent, cfg.silent_eot_weight, 1.0)
  return weights, jnp.sum(is_text) - jnp.sum(kept)


def audio_targets(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(mask [B, S] of positions with an audio target; overflow count [])."""
  kind, seg = batch["kind"].astype(jnp.int32), batch["segment_ids"]
  is_audio = next_position_targets(kind, seg, Kind.AUDIO_OUT) & shift_left(knowable(batch, cfg.burn_in))
  kept = _first_n(is_audio, cfg.max_audio_targets)
  return kept, jnp.sum(is_audio) - jnp.sum(kept)


def target_counts(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(text weight, audio count) of a whole batch: the normalizers of the per-stream losses."""
  text_w, _ = text_target_weights(batch, cfg)
  audio, _ = audio_targets(batch, cfg)
  return jnp.sum(text_w), jnp.sum(audio).astype(jnp.float32)


def gather_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """[B, S] mask with at most `size` Trues per row → (positions [B, size], valid [B, size])."""
  pos = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=0)[0])(mask)
  valid = jnp.arange(size)[None] < jnp.sum(mask, axis=1)[:, None]
  return pos.astype(jnp.int32), valid


def take_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [B, S, ...] at pos [B, n] → [B, n, ...]."""
  return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)


def loss_sums(model: InteractionModel, out: ModelOutput, batch: dict, key: jax.Array, cfg: LossConfig) -> LossSums:
  # Text: cross-entropy on every TEXT_OUT / <eot> target.
  text_w, text_overflow = text_target_weights(batch, cfg)
  pos, valid = gather_positions(text_w > 0, cfg.max_text_targets)
  logits = model.text_logits(take_positions(out.hidden, pos))  # [B, text, V]
  labels = take_positions(shift_left(batch["tokens"]), pos)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
  w = jnp.where(valid, take_positions(text_w, pos), 0.0)

  # Audio: flow matching on every AUDIO_OUT target.
  is_audio, audio_overflow = audio_targets(batch, cfg)
  apos, avalid = gather_positions(is_audio, cfg.max_audio_targets)
  x1 = take_positions(shift_left(batch["mel"]), apos)  # [B, audio, W, M]
  x1 = x1.reshape(*apos.shape, -1)
  per_target = flow_matching_loss(model.flow_head, take_positions(out.hidden, apos), x1, key)  # [B, audio]

  return LossSums(
    text_sum=jnp.sum(ce * w),
    text_weight=jnp.sum(w),
    flow_sum=jnp.sum(per_target * avalid),
    flow_count=jnp.sum(avalid).astype(jnp.float32),
    text_overflow=text_overflow,
    audio_overflow=audio_overflow,
  )
