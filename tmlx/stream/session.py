"""A streaming session: every 200 ms the model hears, maybe sees, and answers (MODEL_SPEC.md §9).

Per micro-turn, `Session.step`:
  1. turns the new 200 ms of user audio into 16 causal dMel frames (4 AUDIO_IN positions), a
     frame (if any) into its patches, typed text and background results into TEXT_IN spans;
  2. prefills that input block into the persistent KV cache (`InteractionModel.extend`; the past
     is never recomputed);
  3. decodes the model's text one token at a time until `<eot>` (or K_max tokens, then `<eot>`);
  4. runs the 4 AUDIO_OUT steps: the flow head's Euler sampler turns the last hidden state into
     the next 4 x 4 mel frames, which are re-quantized to dMel and fed back as the AUDIO_OUT input.

Steps 2-4 are one program call (`_Programs.turn`; a block longer than
`config.stream.input_chunk` positions first prefills its earlier chunks), so a micro-turn costs
one dispatch and one host sync. All device work has fixed shapes, so nothing recompiles after
the first micro-turn:
- the KV cache is preallocated: a ring of `config.stream.window` positions (each position
  attends to that many latest ones; sessions have no length limit), or with window 0 the whole
  session in `config.stream.max_positions` (a session that would outgrow it raises SessionFull);
- attention reads only the written part of the cache, `config.stream.attention_block` slots at
  a time, so a micro-turn costs what the context holds, not what the cache could.

Input blocks are laid out by `data_pipelines.microturn`, the writer of training rows. Teacher
forcing (`step` or `run_block` with `forced_text=...`, `forced_audio=...`) feeds recorded outputs
instead of sampling; with `record=True` the step also returns the text logits and flow-head
conditioning vectors it computed, which the parity test compares with one full forward pass. A
session built with `record_inputs=True` keeps every position it fed the model (`Session.fed`,
output positions as the device built them), which tests/test_microturn.py compares with a
training row.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipelines import dmel as dmel_lib
from data_pipelines import microturn
from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  BIN_WIDTH,
  FRAMES_PER_MICRO_TURN,
  LOG_MEL_MAX,
  LOG_MEL_MIN,
  MEL_NORM_OFFSET,
  MEL_NORM_SCALE,
  NUM_DMEL_BINS,
  NUM_MELS,
  PATCH_SIZE,
  SAMPLES_PER_MICRO_TURN,
  Kind,
  patches_per_frame,
)
from data_pipelines.tokenizer import Tokenizer, make_tokenizer
from tmlx.nn.attention import KVCache
from tmlx.nn.flow_head import sample as flow_sample
from tmlx.nn.model import InteractionModel


class SessionFull(RuntimeError):
  """The next micro-turn would not fit in the preallocated KV cache."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a session samples: text temperature (0 = greedy) and top-p; the flow head's noise
  temperature and Euler steps."""

  temperature: float = 0.0
  top_p: float = 1.0
  audio_temperature: float = 1.0
  audio_steps: int = 10

  @classmethod
  def from_config(cls, stream: ml_collections.ConfigDict) -> Sampling:
    return cls(stream.temperature, stream.top_p, stream.audio_temperature, stream.audio_steps)


@dataclasses.dataclass
class InputBlock:
  """The I block of one micro-turn as model inputs, one entry per position."""

  kind: np.ndarray  # [n] int8
  tokens: np.ndarray  # [n] int32
  dmel: np.ndarray  # [n, F, 80] uint8
  patch_index: np.ndarray  # [n] int32, -1 where not a patch
  patches: np.ndarray  # [P, 40, 40, 3] uint8
  patch_rowcol: np.ndarray  # [P, 2] int16

  def __len__(self) -> int:
    return len(self.kind)


@dataclasses.dataclass
class StepOutput:
  """What the model said in one micro-turn."""

  text_ids: list[int]  # its text tokens, <eot> excluded
  text: str
  mel: np.ndarray  # [16, 80] normalized log-mel frames in [-1, 1]: the next 200 ms ([0, 80] if text-only)
  bg_calls: list[str]  # texts of the <bg_call> spans it wrote
  heard: list[int]  # the input block's text tokens (typed text, background results)
  latency_s: float  # wall time of the step
  heard_dmel: np.ndarray | None = None  # [16, 80] dMel bins of the step's audio (Session.step)
  text_logits: np.ndarray | None = None  # [k + 1, V] fp32 before each text token (record=True)
  flow_cond: np.ndarray | None = None  # [4, W] the flow head's Linear(h) before each AUDIO_OUT


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
_FED_FIELDS = ("kind", "tokens", "dmel", "patch_index", "positions")


def _note(fed: dict[str, jax.Array], i: jax.Array, chunk: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`fed` with slot i set to the one-position `chunk` ({} when not recording)."""
  return {k: v.at[i].set(chunk[k][0, 0]) for k, v in fed.items()}


@flax.struct.dataclass
class _Said:
  """What one `turn` program call produced (device arrays; `record` fills logits and cond,
  `record_inputs` fills fed)."""

  tokens: jax.Array  # [K + 1] int32 text tokens, <eot> included; the first `count` are real
  count: jax.Array  # int32
  mel: jax.Array  # [4, F * 80] fp32 in [-1, 1]; the first `n_audio` rows are real
  key: jax.Array  # the session's next random key
  logits: jax.Array | None  # [K + 1, V] fp32 before each text token
  cond: jax.Array | None  # [4, W] the flow head's Linear(h) before each AUDIO_OUT
  fed: dict[str, jax.Array]  # _FED_FIELDS [K + 1 + 4, ...] of each output position fed; first count + n_audio real


@dataclasses.dataclass
class FedPositions:
  """The positions one micro-turn fed the model, as the programs received them (`record_inputs`)."""

  micro_turn: int
  kind: np.ndarray  # [n] int8
  tokens: np.ndarray  # [n] int32
  dmel: np.ndarray  # [n, F, 80] uint8
  positions: np.ndarray  # [n] int32 in the session (the RoPE position)
  patches: np.ndarray  # [p, 40, 40, 3] uint8: the pixels at each PATCH position, in order
  patch_rowcol: np.ndarray  # [p, 2] int16

  def __len__(self) -> int:
    return len(self.kind)


def _fed_positions(micro_turn: int, chunks: list[tuple[dict[str, np.ndarray], int]]) -> FedPositions:
  """The first n positions of each (chunk, n), as the model reads them: a PATCH position's pixels
  are the ones `InteractionModel` gathers through its patch_index."""
  parts = []
  for chunk, n in chunks:
    part = {k: np.asarray(chunk[k][0, :n]) for k in ("kind", "tokens", "dmel", "positions")}
    at = np.maximum(chunk["patch_index"][0, :n], 0)[part["kind"] == Kind.PATCH]
    part["patches"], part["patch_rowcol"] = chunk["patches"][0][at], chunk["patch_rowcol"][0][at]
    parts.append(part)
  return FedPositions(micro_turn, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


class _Programs:
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
        fed = {k: jnp.zeros((slots, *example[k].shape[2:]), example[k].dtype) for k in _FED_FIELDS}

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


class Session:
  """One conversation with a model, micro-turn by micro-turn (see the module docstring)."""

  def __init__(
    self,
    model: InteractionModel,
    config: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer | None = None,
    worker=None,
    sampling: Sampling | None = None,
    seed: int = 0,
    record_inputs: bool = False,
  ):
    self.model = model
    self.record_inputs = record_inputs  # keep every position fed, per micro-turn, in `self.fed`
    self.config = config
    self.sampling = sampling or Sampling.from_config(config.stream)
    self.max_positions = int(config.stream.max_positions)
    self.input_chunk = int(config.stream.input_chunk)
    self.k_max = int(config.data.k_max)
    self.k_max_text = int(config.data.text_only_k_max)  # K_max of a micro-turn without audio
    self.frame_shape = (int(config.data.frame_height), int(config.data.frame_width))
    self.tokenizer = tokenizer or make_tokenizer(config.data.tokenizer)
    self.worker = worker
    f = model.cfg.frames_per_position
    if f * AUDIO_POSITIONS_PER_MICRO_TURN != FRAMES_PER_MICRO_TURN:
      raise ValueError(f"model.frames_per_position={f}: a session needs 4 audio positions of 4 frames")
    self._frames = f
    self._patches = max(1, patches_per_frame(*self.frame_shape))
    graphdef, self._state = nnx.split(model)
    self._graphdef = graphdef
    num_tokens = min(model.cfg.vocab_size, int(getattr(self.tokenizer, "vocab_size", model.cfg.vocab_size)))
    self._eot = self.tokenizer.special("<eot>")
    block, self.window = int(config.stream.attention_block), int(config.stream.window)
    if block <= 0 or self.window < 0:
      raise ValueError(f"config.stream.attention_block={block} must be > 0 and config.stream.window={self.window} >= 0")
    trained = model.cfg.attention_window
    if trained and self.window != trained:
      raise ValueError(
        f"config.stream.window={self.window}, but the model was trained with model.attention_window={trained}: "
        f"a session must attend as the model learned to (set config.stream.window={trained})"
      )
    if not trained and self.window:
      logging.warning(
        "config.stream.window=%d: a ring of that many positions, for a model trained with full attention "
        "(model.attention_window=0); once the ring wraps it no longer sees the start of its context, which such a "
        "model leans on, and it may fail. Train with model.attention_window=%d.",
        self.window,
        self.window,
      )
    # Cache slots: the whole session, or a ring of the window; plus room for a padded chunk.
    span = (self.window or self.max_positions) + self.input_chunk
    self.cache_slots = -(-span // block) * block
    text_slots = max(self.k_max, self.k_max_text) + 1
    self._programs = _Programs(graphdef, self.sampling, f, num_tokens, self._eot, text_slots, block, self.window)
    self._no_text = np.full(text_slots, -1, np.int32)
    self._no_audio = np.full((AUDIO_POSITIONS_PER_MICRO_TURN, f, NUM_MELS), 255, np.uint8)
    self._no_patch = np.zeros((1, 1, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    self._no_patch_rowcol = np.zeros((1, 1, 2), np.int16)
    self.reset(seed)

  def set_model(self, model: InteractionModel) -> None:
    """Takes the parameters of `model`, a model of the same architecture (e.g. a later step of a
    training run), keeping the compiled programs. Call `reset` before the next conversation."""
    graphdef, state = nnx.split(model)
    if graphdef != self._graphdef:
      raise ValueError("set_model: the model's architecture differs from the one this session was built for")
    self.model, self._state = model, state

  def reset(self, seed: int = 0) -> None:
    """Forgets the conversation (the cache is reused, not reallocated)."""
    # The cache and key are placed like the programs' outputs (on the parameters' mesh,
    # replicated), so that the first call after a reset finds the program it compiled before.
    placed = next(iter(jax.tree.leaves(self._state))).sharding
    if isinstance(placed, jax.sharding.NamedSharding):
      placed = jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec())
    self.cache: KVCache = jax.device_put(self.model.empty_cache(1, self.cache_slots), placed)
    self.position = 0  # positions in the cache
    self.micro_turn = 0
    self._key = jax.device_put(jax.random.key(seed), placed)
    self._featurizer = dmel_lib.StreamingFeaturizer()
    self.transcript: list[tuple[int, str, str]] = []  # (micro-turn, heard text, said text)
    self.fed: list[FedPositions] = []  # with record_inputs
    self._open_call: list[int] | None = None  # tokens of a <bg_call> span not closed yet

  # -- inputs ----------------------------------------------------------------------------------

  def input_block(
    self,
    dmel: np.ndarray | None,
    frame: np.ndarray | None = None,
    typed_text: str | Sequence[str] | None = None,
    bg_results: Sequence[str] = (),
  ) -> InputBlock:
    """The I block: <mt>, background results and typed texts (one span each; a str is one text)
    as TEXT_IN spans, the frame's patches, and the 4 AUDIO_IN positions of `dmel` bins [16, 80]
    (None: a text-only turn), laid out by `data_pipelines.microturn` as training rows are."""
    results = [self.tokenizer.encode(r) for r in bg_results]
    texts = [typed_text] if isinstance(typed_text, str) else list(typed_text or ())
    typed = [self.tokenizer.encode(t) for t in texts if t]
    for ids in (*results, *typed):
      if ids and max(ids) >= self.model.cfg.vocab_size:
        raise ValueError(f"input text has token id {max(ids)} >= model.vocab_size={self.model.cfg.vocab_size}")
    if frame is not None:
      if tuple(frame.shape[:2]) != self.frame_shape:
        raise ValueError(
          f"frame is {frame.shape[0]}x{frame.shape[1]} pixels; the model was trained on "
          f"config.data.frame_height x frame_width = {self.frame_shape[0]}x{self.frame_shape[1]}"
        )
      frame = np.asarray(frame, np.uint8)
    heard = None if dmel is None else np.asarray(dmel, np.uint8)
    mt = microturn.MicroTurn(self.micro_turn, bg_results=results, typed_text=typed, frame=frame, heard=heard)
    p = microturn.positions(mt, self._frames)
    return InputBlock(p.kind, p.tokens, p.dmel, p.patch_index, p.patches, p.patch_rowcol)

  # -- one micro-turn --------------------------------------------------------------------------

  def step(
    self,
    audio: np.ndarray,
    frame: np.ndarray | None = None,
    typed_text: str | Sequence[str] | None = None,
    bg_results: Sequence[str] = (),
    *,
    forced_text: Sequence[int] | None = None,
    forced_audio: np.ndarray | None = None,
  ) -> StepOutput:
    """Hears 200 ms of user audio (3200 samples at 16 kHz), and the frame, typed text and
    background results of this window; returns what the model says next (`forced_text`: say
    these tokens instead, `<eot>` last, e.g. to replay a script; `forced_audio`: feed these dMel
    bins [4, F, 80] or [16, 80] back as the AUDIO_OUT inputs instead of the sampled speech's)."""
    audio = np.asarray(audio)
    if audio.shape != (SAMPLES_PER_MICRO_TURN,):
      raise ValueError(f"audio: expected {SAMPLES_PER_MICRO_TURN} samples (200 ms at 16 kHz), got {audio.shape}")
    t0 = time.perf_counter()
    bins = dmel_lib.quantize(self._featurizer.push(audio))
    results = list(bg_results) + (list(self.worker.poll()) if self.worker is not None else [])
    block = self.input_block(bins, frame, typed_text, results)
    out = self.run_block(block, forced_text=forced_text, forced_audio=forced_audio, started=t0)
    if self.worker is not None:
      for call in out.bg_calls:
        self.worker.submit(call, self.conversation())
    out.heard_dmel = bins
    return out

  def run_block(
    self,
    block: InputBlock,
    *,
    forced_text: Sequence[int] | None = None,
    forced_audio: np.ndarray | None = None,
    record: bool = False,
    started: float | None = None,
  ) -> StepOutput:
    """Prefills `block`, then decodes the text and the 4 AUDIO_OUT positions of this micro-turn.

    `forced_text` (the tokens, `<eot>` last) and `forced_audio` (dMel bins [4, F, 80] or [4F, 80])
    replace sampling by the recorded outputs (teacher forcing)."""
    t0 = time.perf_counter() if started is None else started
    # A block with audio in gets audio out; a text-only block (as in text-only training data) not.
    a = AUDIO_POSITIONS_PER_MICRO_TURN if (block.kind == Kind.AUDIO_IN).any() else 0
    k_max = self.k_max if a else self.k_max_text
    needed = len(block) + k_max + 1 + a
    if not self.window and self.position + needed > self.max_positions:
      raise SessionFull(
        f"micro-turn {self.micro_turn} needs up to {needed} more positions but the KV cache holds "
        f"{self.max_positions - self.position} of config.stream.max_positions={self.max_positions}; "
        "raise it (memory grows linearly), set config.stream.window, or start a new session"
      )
    programs, state = self._programs, self._state
    chunks = [(lo, min(len(block), lo + self.input_chunk)) for lo in range(0, len(block), self.input_chunk)]
    sent = []  # (chunk, its real positions) as the programs received them, for record_inputs
    for lo, hi in chunks[:-1]:
      chunk = self._chunk(block, lo, hi)
      self.cache = programs.prefill(state, chunk, self.cache, np.int32(self.position))
      sent.append((chunk, hi - lo))
      self.position += hi - lo
    lo, hi = chunks[-1]
    chunk = self._chunk(block, lo, hi)
    sent.append((chunk, hi - lo))
    forced = self._no_text
    if forced_text is not None:
      forced = self._no_text.copy()
      forced[: len(forced_text)] = np.asarray(forced_text, np.int32)[: len(forced)]
    said, self.cache = programs.turn(
      state,
      chunk,
      self.cache,
      np.int32(self.position),
      np.int32(hi - lo - 1),
      self._key,
      forced,
      np.int32(k_max),
      self._no_audio if forced_audio is None else np.asarray(forced_audio, np.uint8).reshape(self._no_audio.shape),
      np.int32(a),
      record=record,
      record_inputs=self.record_inputs,
    )
    self._key = said.key
    tokens, count, mel = jax.device_get((said.tokens, said.count, said.mel))
    if self.record_inputs:
      said_fed = {k: v[None] for k, v in jax.device_get(said.fed).items()}
      sent.append((dict(said_fed, patches=self._no_patch, patch_rowcol=self._no_patch_rowcol), int(count) + a))
      self.fed.append(_fed_positions(self.micro_turn, sent))
    self.position += hi - lo + int(count) + a
    ids = [int(t) for t in tokens[: int(count)]]
    if ids and ids[-1] == self._eot:
      ids.pop()
    mel = mel[:a].reshape(-1, NUM_MELS)
    text = self.tokenizer.decode(ids)
    heard = [int(t) for t, k in zip(block.tokens, block.kind) if k == Kind.TEXT_IN]
    self.transcript.append((self.micro_turn, self.tokenizer.decode(heard), text))
    self.micro_turn += 1
    return StepOutput(
      text_ids=ids,
      text=text,
      mel=mel,
      bg_calls=self._bg_calls(ids),
      heard=heard,
      latency_s=time.perf_counter() - t0,
      text_logits=np.asarray(said.logits[: int(count)]) if record else None,
      flow_cond=np.asarray(said.cond[:a]) if record and a else None,
    )

  def _chunk(self, block: InputBlock, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Positions lo..hi-1 of `block`, padded to `input_chunk` (the padding is never attended)."""
    c, n = self.input_chunk, hi - lo
    pad = lambda x, fill=0: np.concatenate([x[lo:hi], np.full((c - n, *x.shape[1:]), fill, x.dtype)])[None]
    index = block.patch_index[lo:hi]
    used = index[index >= 0]
    patches = np.zeros((1, self._patches, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    rowcol = np.zeros((1, self._patches, 2), np.int16)
    local = np.full(c, -1, np.int32)
    if used.size:  # this chunk's patches, renumbered from 0
      patches[0, : used.size] = block.patches[used]
      rowcol[0, : used.size] = block.patch_rowcol[used]
      local[:n] = np.where(index >= 0, index - used.min(), -1)
    return {
      "kind": pad(block.kind),
      "tokens": pad(block.tokens),
      "dmel": pad(block.dmel),
      "patch_index": local[None],
      "patches": patches,
      "patch_rowcol": rowcol,
      "positions": (self.position + np.arange(c, dtype=np.int32))[None],
    }

  def _bg_calls(self, ids: list[int]) -> list[str]:
    """The texts of the <bg_call> ... </bg_call> spans that `ids` completes (a span longer than
    K_max continues over the next micro-turns, as in the training data)."""
    open_, close = self.tokenizer.special("<bg_call>"), self.tokenizer.special("</bg_call>")
    calls = []
    for token in ids:
      if token == open_:
        self._open_call = []
      elif token == close and self._open_call is not None:
        calls.append(self.tokenizer.decode(self._open_call))
        self._open_call = None
      elif self._open_call is not None:
        self._open_call.append(token)
    return calls

  def conversation(self) -> str:
    """The conversation so far as text, one line per micro-turn with something in it."""
    lines = []
    for t, heard, said in self.transcript:
      if heard:
        lines.append(f"[{t}] user: {heard}")
      if said:
        lines.append(f"[{t}] model: {said}")
    return "\n".join(lines)
