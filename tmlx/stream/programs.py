"""A session's device work: the two jitted programs (`Programs.prefill`, `Programs.turn`) and the
on-device helpers they use (dMel re-quantization, token sampling, one-position chunks)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  BIN_WIDTH,
  LOG_MEL_MAX,
  LOG_MEL_MIN,
  MEL_NORM_OFFSET,
  MEL_NORM_SCALE,
  NUM_DMEL_BINS,
  NUM_MELS,
  PATCH_SIZE,
  Kind,
)
from tmlx.nn.flow_head import sample as flow_sample
from tmlx.stream.config import Sampling


def quantize(log_mel: jax.Array) -> jax.Array:
  """`data_pipelines.dmel.quantize` on device: log10 mel → nearest of the 16 dMel bins."""
  v = jnp.clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX)
  return jnp.clip(jnp.round((v - LOG_MEL_MIN) / BIN_WIDTH), 0, NUM_DMEL_BINS - 1).astype(jnp.uint8)


def denormalize(x: jax.Array) -> jax.Array:
  """`data_pipelines.dmel.denormalize` on device: flow-head output in [-1, 1] → log10 mel."""
  return x * MEL_NORM_SCALE - MEL_NORM_OFFSET


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """A token id from fp32 logits [V]: greedy at temperature 0, else nucleus sampling."""
  if temperature <= 0:
    return jnp.argmax(logits).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1:
    ordered = jnp.sort(logits)[::-1]
    probs = jax.nn.softmax(ordered)
    keep = (jnp.cumsum(probs) - probs) < top_p  # the smallest prefix whose mass reaches top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf))
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _one_position(kind: int, f: int, position: jax.Array, token=0, bins=None) -> dict[str, jax.Array]:
  """A chunk of one position (no patch) for `InteractionModel.extend`."""
  return {
    "kind": jnp.full((1, 1), kind, jnp.int8),
    "tokens": jnp.reshape(jnp.asarray(token, jnp.int32), (1, 1)),
    "dmel": (jnp.zeros((1, 1, f, NUM_MELS), jnp.uint8) if bins is None else bins.reshape(1, 1, f, NUM_MELS)),
    "patch_index": jnp.full((1, 1), -1, jnp.int32),
    "patches": jnp.zeros((1, 1, PATCH_SIZE, PATCH_SIZE, 3), jnp.uint8),
    "patch_rowcol": jnp.zeros((1, 1, 2), jnp.int16),
    "positions": jnp.reshape(position, (1, 1)),
  }


# The fields of a one-position chunk that `record_inputs` keeps (patches: outputs have none).
FED_FIELDS = ("kind", "tokens", "dmel", "patch_index", "positions")


def _note(fed: dict[str, jax.Array], i: jax.Array, chunk: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`fed` with slot i set to the one-position `chunk` ({} when not recording)."""
  return {k: v.at[i].set(chunk[k][0, 0]) for k, v in fed.items()}


@flax.struct.dataclass
class _Said:
  """What one `turn` program call produced (device arrays; `record` fills logits and cond,
  `record_inputs` fills fed)."""

  tokens: jax.Array  # [K + 1] int32 text tokens, <eot> included; the first `count` are real
  count: jax.Array  # int32
  mel: jax.Array  # [4, Y] fp32 (Y = W·M) in [-1, 1]; the first `n_audio` rows are real
  key: jax.Array  # the session's next random key
  logits: jax.Array | None  # [K + 1, V] fp32 before each text token
  cond: jax.Array | None  # [4, U] the flow head's Linear(h) before each AUDIO_OUT
  fed: dict[str, jax.Array]  # FED_FIELDS [K + 1 + 4, ...] of each output position fed; first count + n_audio real


class Programs:
  """The session's two jitted programs; the cache is donated, so it is updated in place.

  `prefill` appends input positions. `turn` appends the last chunk of an input block, then says
  this micro-turn's text (a while loop that stops at `<eot>`) and audio (a loop of the 4
  AUDIO_OUT steps), all in one call: one dispatch and one host sync per micro-turn.
  """

  def __init__(
    self, graphdef, sampling: Sampling, f: int, num_tokens: int, eot: int, text_slots: int, block: int, window: int
  ):
    def prefill(state, chunk, cache, start):
      _, cache = nnx.merge(graphdef, state).extend(chunk, cache, start, block=block, window=window)
      return cache

    def turn(state, chunk, cache, start, last, key, forced_text, k_max, forced_audio, n_audio, record, record_inputs):
      model = nnx.merge(graphdef, state)
      h, cache = model.extend(chunk, cache, start, block=block, window=window)
      h, position = h[0, last], start + last + 1
      v, w = model.cfg.vocab_size, model.flow_head.cond.kernel.shape[-1]
      fed = {}
      if record_inputs:
        example = _one_position(Kind.PAD, f, position)
        slots = text_slots + AUDIO_POSITIONS_PER_MICRO_TURN
        fed = {k: jnp.zeros((slots, *example[k].shape[2:]), example[k].dtype) for k in FED_FIELDS}

      def say_text(carry):
        i, _, h, cache, position, key, tokens, logits_seen, fed = carry
        key, sub = jax.random.split(key)
        logits = model.text_logits(h)
        # Only ids the tokenizer has (the model's vocabulary may be padded beyond them).
        allowed = jnp.where(jnp.arange(v) < num_tokens, logits, -jnp.inf)
        token = sample_token(allowed, sub, sampling.temperature, sampling.top_p)
        token = jnp.where(i == k_max, eot, token)  # K_max tokens said: <eot> next
        token = jnp.where(forced_text[i] >= 0, forced_text[i], token)
        chunk = _one_position(Kind.TEXT_OUT, f, position, token=token)
        out, cache = model.extend(chunk, cache, position, block=block, window=window)
        if record:
          logits_seen = logits_seen.at[i].set(logits)
        fed = _note(fed, i, chunk)
        return i + 1, token == eot, out[0, 0], cache, position + 1, key, tokens.at[i].set(token), logits_seen, fed

      text = (
        jnp.int32(0),
        jnp.bool_(False),
        h,
        cache,
        position,
        key,
        jnp.zeros(text_slots, jnp.int32),
        jnp.zeros((text_slots, v) if record else (), jnp.float32),
        fed,
      )
      count, _, h, cache, position, key, tokens, logits_seen, fed = jax.lax.while_loop(
        lambda c: ~c[1] & (c[0] < text_slots), say_text, text
      )

      def say_audio(j, carry):
        h, cache, key, mel, conds, fed = carry
        key, sub = jax.random.split(key)
        x = flow_sample(model.flow_head, h, sub, steps=sampling.audio_steps, temperature=sampling.audio_temperature)
        bins = quantize(denormalize(x)).reshape(f, NUM_MELS)
        bins = jnp.where(forced_audio[j, 0, 0] < 255, forced_audio[j], bins)  # 255 marks "not forced"
        if record:
          conds = conds.at[j].set(model.flow_head.cond(h).astype(jnp.float32))
        chunk = _one_position(Kind.AUDIO_OUT, f, position + j, bins=bins)
        out, cache = model.extend(chunk, cache, position + j, block=block, window=window)
        return out[0, 0], cache, key, mel.at[j].set(x), conds, _note(fed, count + j, chunk)

      audio = (
        h,
        cache,
        key,
        jnp.zeros((AUDIO_POSITIONS_PER_MICRO_TURN, f * NUM_MELS), jnp.float32),
        jnp.zeros((AUDIO_POSITIONS_PER_MICRO_TURN, w) if record else (), jnp.float32),
        fed,
      )
      _, cache, key, mel, conds, fed = jax.lax.fori_loop(0, n_audio, say_audio, audio)
      said = _Said(tokens, count, mel, key, logits_seen if record else None, conds if record else None, fed)
      return said, cache

    self.prefill = jax.jit(prefill, donate_argnums=(2,))
    self.turn = jax.jit(turn, donate_argnums=(2,), static_argnames=("record", "record_inputs"))
