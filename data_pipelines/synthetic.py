"""A learnable synthetic conversation source in the packed-batch contract.

Each micro-turn the user "says" one of `num_words` words: its dMel frames follow a fixed per-word
pattern plus noise, and an optional video frame is tinted by the word. The model stream is a
deterministic function of the user stream: in O_t the model writes the word it heard in I_t (at
most K_max bytes, then `<eot>`; word 0 is silence and gets only `<eot>`) and speaks a fixed
per-word mel template. A falling loss therefore means the model learned to listen.

Every row is a pure function of (seed, step, row); the word tables depend on the seed only. The
micro-turns are laid out by `data_pipelines.microturn`, like episode rows and live sessions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import dmel, microturn
from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  NUM_MELS,
  RowSpec,
  min_positions_per_micro_turn,
  patches_per_frame,
  special_id,
)
from data_pipelines.tokenizer import ByteTokenizer

_WORDS = (
  "",
  "yes",
  "no",
  "okay",
  "hello",
  "right",
  "sure",
  "wait",
  "thanks",
  "bye",
  "what",
  "nice",
  "maybe",
  "cool",
  "hmm",
  "great",
  "well",
  "so",
  "oh",
  "good",
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Static settings of the synthetic source (config `data` and `data.synthetic`)."""

  row: RowSpec
  seed: int
  num_words: int
  min_window: int
  max_window: int
  video_prob: float
  typed_text_prob: float
  k_max: int
  frame_height: int
  frame_width: int

  @property
  def patches_per_frame(self) -> int:
    return patches_per_frame(self.frame_height, self.frame_width)


class _Tables:
  """Per-word dMel patterns, mel templates and frame colours, fixed by the seed."""

  def __init__(self, spec: SyntheticSpec):
    if not 2 <= spec.num_words <= len(_WORDS):
      raise ValueError(f"data.synthetic.num_words={spec.num_words} must be in [2, {len(_WORDS)}]")
    rng = np.random.default_rng([spec.seed, 0x7AB1E5])
    n, f = spec.num_words, spec.row.frames_per_position
    self.words = [ByteTokenizer().encode(w)[: spec.k_max] for w in _WORDS[:n]]
    # User audio: a per-word spectral shape around a per-word centre; word 0 is near-silence.
    centres = rng.uniform(5, NUM_MELS - 5, size=n)
    channels = np.arange(NUM_MELS)
    shape = np.exp(-0.5 * ((channels[None] - centres[:, None]) / 8.0) ** 2)
    self.user_log_mel = -6.5 + 6.0 * shape  # [n, 80]
    self.user_log_mel[0] = -6.8
    # Model audio: per-word templates over the 4 positions x F frames, drifting in frequency.
    t = np.arange(AUDIO_POSITIONS_PER_MICRO_TURN * f).reshape(-1, f)
    drift = rng.uniform(-1.0, 1.0, size=n)
    out_centres = rng.uniform(10, NUM_MELS - 10, size=n)
    c = out_centres[:, None, None] + drift[:, None, None] * t[None]
    bump = np.exp(-0.5 * ((channels[None, None, None] - c[..., None]) / 6.0) ** 2)
    log_mel = -6.0 + 6.5 * bump  # [n, 4, F, 80]
    log_mel[0] = -7.0
    self.model_mel = dmel.normalize(log_mel).astype(np.float16)
    self.model_dmel = microturn.said_bins(self.model_mel)
    self.colours = rng.integers(0, 256, size=(n, 3))


class SyntheticSource:
  """Packs synthetic episode windows into rows; `row(step, index)` is deterministic."""

  def __init__(self, spec: SyntheticSpec):
    self.spec = spec
    self.tables = _Tables(spec)
    self._eot = special_id("<eot>")
    self._min_mt = min_positions_per_micro_turn(0)

  def row(self, step: int, index: int) -> dict[str, np.ndarray]:
    spec = self.spec
    rng = np.random.default_rng([spec.seed, step, index])
    out = spec.row.empty_row()
    pos = 0
    num_patches = 0
    segment = 0
    while spec.row.seq_len - pos >= self._min_mt:
      segment += 1
      first_mt = int(rng.integers(0, 1000))
      window = int(rng.integers(spec.min_window, spec.max_window + 1))
      turns, used, patches = [], 0, num_patches
      for t in range(window):
        mt = self._micro_turn(rng, first_mt + t, patches)
        n = microturn.num_positions(mt)
        if pos + used + n > spec.row.seq_len:
          break
        turns.append(mt)
        used += n
        patches += microturn.num_patches(mt)
      if not turns:  # not even one micro-turn fit: the row is full
        break
      pos, num_patches = microturn.write_window(out, turns, segment, pos, num_patches)
    return out

  def _micro_turn(self, rng: np.random.Generator, index: int, patches_used: int) -> microturn.MicroTurn:
    spec, tab = self.spec, self.tables
    f = spec.row.frames_per_position
    word = int(rng.integers(0, spec.num_words))
    typed = []
    if rng.random() < spec.typed_text_prob:
      typed.append(tab.words[int(rng.integers(1, spec.num_words))])
    frame = None
    ppf = spec.patches_per_frame
    if ppf and rng.random() < spec.video_prob and patches_used + ppf <= spec.row.max_patches:
      frame = np.clip(
        tab.colours[word] + rng.normal(0, 20, size=(spec.frame_height, spec.frame_width, 3)), 0, 255
      ).astype(np.uint8)
    a = AUDIO_POSITIONS_PER_MICRO_TURN
    user_log_mel = tab.user_log_mel[word] + rng.normal(0, 0.3, size=(a, f, NUM_MELS))
    return microturn.MicroTurn(
      index=index,
      typed_text=typed,
      frame=frame,
      heard=dmel.quantize(user_log_mel).reshape(a * f, NUM_MELS),
      said_text=[*tab.words[word], self._eot],
      said_mel=tab.model_mel[word].reshape(a * f, NUM_MELS),
      said_dmel=tab.model_dmel[word].reshape(a * f, NUM_MELS),
    )
