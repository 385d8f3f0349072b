"""Training losses of the interaction model (MODEL_SPEC.md §4).

The hidden state at position p predicts position p+1. Targets are gathered first (up to a static
number per row), so logits and flow-head passes run only where there is something to predict.

Dimensions: B batch, S sequence, D model, T text targets per row, A audio targets per row,
M mel values per position.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from data_pipelines.contract import Kind
from tmlx.nn.flow_head import flow_matching_loss
from tmlx.nn.model import InteractionModel, ModelOutput


@dataclasses.dataclass(frozen=True)
class LossConfig:
  text_weight: float
  flow_weight: float
  silent_eot_weight: float
  max_text_targets: int  # T
  max_audio_targets: int  # A
  load_balance_weight: float
  z_loss_weight: float
  eot_id: int
  burn_in: int = 0  # micro-turns of a window that starts mid-conversation with no output loss


@flax.struct.dataclass
class LossSums:
  """Sums and counts, so that micro-batches add up to the full batch exactly."""

  text_sum: jax.Array  # weighted cross-entropy summed over text targets
  text_weight: jax.Array  # summed target weights
  flow_sum: jax.Array
  flow_count: jax.Array
  text_overflow: jax.Array  # text targets past the static bound (not trained on)
  audio_overflow: jax.Array


def _shift_left(x: jax.Array) -> jax.Array:
  """x[:, p] ← x[:, p+1] (what position p predicts); the last position gets zeros (PAD, no segment)."""
  return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def next_position_targets(kind: jax.Array, segment_ids: jax.Array, target_kind: Kind) -> jax.Array:
  """[B, S] bool: position p whose successor p+1 is a `target_kind` in the same segment."""
  return (_shift_left(kind) == target_kind) & (_shift_left(segment_ids) == segment_ids) & (segment_ids > 0)


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
  is_text = next_position_targets(kind, seg, Kind.TEXT_OUT) & _shift_left(knowable(batch, cfg.burn_in))
  kept = _first_n(is_text, cfg.max_text_targets)
  # An <eot> right after a non-text position ends a silent micro-turn.
  silent = (_shift_left(batch["tokens"]) == cfg.eot_id) & (kind != Kind.TEXT_OUT)
  weights = kept * jnp.where(silent, cfg.silent_eot_weight, 1.0)
  return weights, jnp.sum(is_text) - jnp.sum(kept)


def audio_targets(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(mask [B, S] of positions with an audio target; overflow count [])."""
  kind, seg = batch["kind"].astype(jnp.int32), batch["segment_ids"]
  is_audio = next_position_targets(kind, seg, Kind.AUDIO_OUT) & _shift_left(knowable(batch, cfg.burn_in))
  kept = _first_n(is_audio, cfg.max_audio_targets)
  return kept, jnp.sum(is_audio) - jnp.sum(kept)


def target_counts(batch: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
  """(text weight, audio count) of a whole batch: the normalizers of the per-stream losses."""
  text_w, _ = text_target_weights(batch, cfg)
  audio, _ = audio_targets(batch, cfg)
  return jnp.sum(text_w), jnp.sum(audio).astype(jnp.float32)


def _gather_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """[B, S] mask with at most `size` Trues per row → (positions [B, size], valid [B, size])."""
  pos = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=0)[0])(mask)
  valid = jnp.arange(size)[None] < jnp.sum(mask, axis=1)[:, None]
  return pos.astype(jnp.int32), valid


def _take(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [B, S, ...] at pos [B, T] → [B, T, ...]."""
  return jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)


def loss_sums(model: InteractionModel, out: ModelOutput, batch: dict, key: jax.Array, cfg: LossConfig) -> LossSums:
  # Text: cross-entropy on every TEXT_OUT / <eot> target.
  text_w, text_overflow = text_target_weights(batch, cfg)
  pos, valid = _gather_positions(text_w > 0, cfg.max_text_targets)
  logits = model.text_logits(_take(out.hidden, pos))  # [B, T, V]
  labels = _take(_shift_left(batch["tokens"]), pos)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
  w = jnp.where(valid, _take(text_w, pos), 0.0)

  # Audio: flow matching on every AUDIO_OUT target.
  is_audio, audio_overflow = audio_targets(batch, cfg)
  apos, avalid = _gather_positions(is_audio, cfg.max_audio_targets)
  x1 = _take(_shift_left(batch["mel"]), apos)  # [B, A, F, 80]
  x1 = x1.reshape(*apos.shape, -1)
  per_target = flow_matching_loss(model.flow_head, _take(out.hidden, apos), x1, key)  # [B, A]

  return LossSums(
    text_sum=jnp.sum(ce * w),
    text_weight=jnp.sum(w),
    flow_sum=jnp.sum(per_target * avalid),
    flow_count=jnp.sum(avalid).astype(jnp.float32),
    text_overflow=text_overflow,
    audio_overflow=audio_overflow,
  )
