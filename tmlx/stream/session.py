"""A streaming session: every 200 ms the model hears, maybe sees, and answers (MODEL_SPEC.md §9).

Per micro-turn, `Session.step`:
  1. turns the new 200 ms of user audio into 16 causal dMel frames (4 AUDIO_IN positions), a
     frame (if any) into its patches, typed text and background results into TEXT_IN spans;
  2. prefills that input block into the persistent KV cache (`InteractionModel.extend`; the past
     is never recomputed);
  3. decodes the model's text one token at a time until `<eot>` (or K_max tokens, then `<eot>`);
  4. runs the 4 AUDIO_OUT steps: the flow head's Euler sampler turns the last hidden state into
     the next 4 x 4 mel frames, which are re-quantized to dMel and fed back as the AUDIO_OUT input.

Steps 2-4 are one program call (`Programs.turn`; a block longer than
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

import jax
import numpy as np
from absl import logging
from flax import nnx

from data_pipelines import dmel as dmel_lib
from data_pipelines import microturn
from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  FRAMES_PER_MICRO_TURN,
  NUM_MELS,
  PATCH_SIZE,
  SAMPLES_PER_MICRO_TURN,
  Kind,
  patches_per_frame,
)
from data_pipelines.tokenizer import Tokenizer, make_tokenizer
from tmlx.nn.attention import KVCache
from tmlx.nn.model import InteractionModel
from tmlx.stream.config import StreamConfig
from tmlx.stream.programs import Programs


class SessionFull(RuntimeError):
  """The next micro-turn would not fit in the preallocated KV cache."""


@dataclasses.dataclass
class InputBlock:
  """The I block of one micro-turn as model inputs, one entry per position."""

  kind: np.ndarray  # [n] int8
  tokens: np.ndarray  # [n] int32
  dmel: np.ndarray  # [n, W, M] uint8
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
  flow_cond: np.ndarray | None = None  # [4, U] the flow head's Linear(h) before each AUDIO_OUT


@dataclasses.dataclass
class FedPositions:
  """The positions one micro-turn fed the model, as the programs received them (`record_inputs`)."""

  micro_turn: int
  kind: np.ndarray  # [n] int8
  tokens: np.ndarray  # [n] int32
  dmel: np.ndarray  # [n, W, M] uint8
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


class Session:
  """One conversation with a model, micro-turn by micro-turn (see the module docstring)."""

  def __init__(
    self,
    model: InteractionModel,
    stream: StreamConfig,
    *,
    tokenizer: Tokenizer | None = None,
    worker=None,
    seed: int = 0,
    record_inputs: bool = False,
  ):
    if not isinstance(stream, StreamConfig):
      raise TypeError(f"Session(model, stream): expected a StreamConfig (from_config), got {type(stream).__name__}")
    self.model = model
    self.record_inputs = record_inputs  # keep every position fed, per micro-turn, in `self.fed`
    self.stream = stream
    self.tokenizer = tokenizer or make_tokenizer(stream.tokenizer)
    self.worker = worker
    f = model.cfg.frames_per_position
    if f * AUDIO_POSITIONS_PER_MICRO_TURN != FRAMES_PER_MICRO_TURN:
      raise ValueError(f"model.frames_per_position={f}: a session needs 4 audio positions of 4 frames")
    self._frames = f
    self._patches = max(1, patches_per_frame(*stream.frame_shape))
    graphdef, self._state = nnx.split(model)
    self._graphdef = graphdef
    num_tokens = min(model.cfg.vocab_size, int(getattr(self.tokenizer, "vocab_size", model.cfg.vocab_size)))
    self._eot = self.tokenizer.special("<eot>")
    block, window = stream.attention_block, stream.window
    trained = model.cfg.attention_window
    if trained and window != trained:
      raise ValueError(
        f"config.stream.window={window}, but the model was trained with model.attention_window={trained}: "
        f"a session must attend as the model learned to (set config.stream.window={trained})"
      )
    if not trained and window:
      logging.warning(
        "config.stream.window=%d: a ring of that many positions, for a model trained with full attention "
        "(model.attention_window=0); once the ring wraps it no longer sees the start of its context, which such a "
        "model leans on, and it may fail. Train with model.attention_window=%d.",
        window,
        window,
      )
    # Cache slots: the whole session, or a ring of the window; plus room for a padded chunk.
    span = (window or stream.max_positions) + stream.input_chunk
    self.cache_slots = -(-span // block) * block
    text_slots = max(stream.k_max, stream.k_max_text) + 1
    self._programs = Programs(graphdef, stream.sampling, f, num_tokens, self._eot, text_slots, block, window)
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
      if tuple(frame.shape[:2]) != self.stream.frame_shape:
        raise ValueError(
          f"frame is {frame.shape[0]}x{frame.shape[1]} pixels; the model was trained on "
          f"config.data.frame_height x frame_width = {self.stream.frame_shape[0]}x{self.stream.frame_shape[1]}"
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
    bins [4, W, M] or [16, 80] back as the AUDIO_OUT inputs instead of the sampled speech's)."""
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

    `forced_text` (the tokens, `<eot>` last) and `forced_audio` (dMel bins [4, W, M] or [4·W, M])
    replace sampling by the recorded outputs (teacher forcing)."""
    t0 = time.perf_counter() if started is None else started
    # A block with audio in gets audio out; a text-only block (as in text-only training data) not.
    a = AUDIO_POSITIONS_PER_MICRO_TURN if (block.kind == Kind.AUDIO_IN).any() else 0
    k_max = self.stream.k_max if a else self.stream.k_max_text
    needed = len(block) + k_max + 1 + a
    if not self.stream.window and self.position + needed > self.stream.max_positions:
      raise SessionFull(
        f"micro-turn {self.micro_turn} needs up to {needed} more positions but the KV cache holds "
        f"{self.stream.max_positions - self.position} of config.stream.max_positions={self.stream.max_positions}; "
        "raise it (memory grows linearly), set config.stream.window, or start a new session"
      )
    programs, state = self._programs, self._state
    chunks = [
      (lo, min(len(block), lo + self.stream.input_chunk)) for lo in range(0, len(block), self.stream.input_chunk)
    ]
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
    c, n = self.stream.input_chunk, hi - lo
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
