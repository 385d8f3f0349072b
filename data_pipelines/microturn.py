"""One micro-turn as model positions (MODEL_SPEC.md §3): the one writer of the sequence layout.

Training rows from episode datasets (`episode_source`), synthetic rows (`synthetic`) and the live
session's input blocks (`tmlx.stream.Session.input_block`) all lay their micro-turns out here, so
that what a model is fed live cannot drift from what it was trained on:

    I_t  <mt>  [<bg_result> .. </bg_result>]*  [<user_text> .. </user_text>]*  [PATCH x P]  [AUDIO_IN x 4]
    O_t  [TEXT_OUT x k  <eot>]  [AUDIO_OUT x 4]

A micro-turn without user audio (text-only data) has no audio positions; one without `said_text`
is an input block only (what a live session prefills before it decodes). The session builds its
O_t positions on device as it samples them; tests/test_microturn.py checks that what it feeds
equals a training row, position by position.

Letters: n positions of the micro-turn, p its patches, F dMel frames per audio position (4 for
episode data: 16 frames per micro-turn in 4 positions), M mel channels (80), H, W frame pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from data_pipelines import dmel, video
from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  FRAMES_PER_MICRO_TURN,
  NUM_MELS,
  PATCH_SIZE,
  Kind,
  patches_per_frame,
  special_id,
)
from data_pipelines.episode import Episode, Span

if TYPE_CHECKING:
  from data_pipelines.align import Layout

_MT = special_id("<mt>")
_BG_RESULT = (special_id("<bg_result>"), special_id("</bg_result>"))
_USER_TEXT = (special_id("<user_text>"), special_id("</user_text>"))


@dataclasses.dataclass
class MicroTurn:
  """The inputs of micro-turn `index` (I_t) and, for training rows and references, its outputs (O_t).

  Text is token ids without the special tokens around each span (the writer adds them).
  """

  index: int  # micro-turn index within the episode (the row's `micro_turn`)
  bg_results: list[list[int]] = dataclasses.field(default_factory=list)  # each background result that arrived
  typed_text: list[list[int]] = dataclasses.field(default_factory=list)  # each text the user typed
  frame: np.ndarray | None = None  # [H, W, 3] uint8, the video frame of window t
  heard: np.ndarray | None = None  # [4F, M] uint8 dMel bins of the user's window t; None: a text-only turn
  said_text: list[int] | None = None  # O_t's TEXT_OUT ids, <eot> last; None: an input block only
  said_mel: np.ndarray | None = None  # [4F, M] float16 normalized log-mel of the model's window t+1
  # [4F, M] uint8 AUDIO_OUT inputs, said_bins(said_mel) (None: computed from it). window_micro_turns
  # fills it, a whole window's at once; a session is teacher-forced with it (`Session.step(forced_audio=)`).
  said_dmel: np.ndarray | None = None


@dataclasses.dataclass
class Positions:
  """One micro-turn as model inputs, one entry per position."""

  kind: np.ndarray  # [n] int8
  tokens: np.ndarray  # [n] int32
  dmel: np.ndarray  # [n, F, M] uint8: `heard` at AUDIO_IN, `said_dmel` at AUDIO_OUT, 0 elsewhere
  mel: np.ndarray  # [n, F, M] float16: the flow target at AUDIO_OUT, 0 elsewhere
  patch_index: np.ndarray  # [n] int32 into `patches` at PATCH positions, -1 elsewhere
  patches: np.ndarray  # [p, 40, 40, 3] uint8
  patch_rowcol: np.ndarray  # [p, 2] int16

  def __len__(self) -> int:
    return len(self.kind)


def said_bins(mel: np.ndarray) -> np.ndarray:
  """Normalized log-mel [...] → the dMel bins [...] uint8 the model's speech is fed back as: what
  a live session does with the mel it samples (`tmlx.stream.session`), applied to the recording."""
  return dmel.quantize(dmel.denormalize(mel))


def micro_turn_size(
  text_spans: Iterable[Sequence[int]], patches: int, audio_in: bool, said_text: Sequence[int] | None, audio_out: bool
) -> int:
  """Positions of a micro-turn with these TEXT_IN spans (unwrapped), patches, user audio, O_t text
  and model audio: what `write` writes, computed without the media (to plan rows)."""
  a = AUDIO_POSITIONS_PER_MICRO_TURN
  text = sum(len(s) + 2 for s in text_spans)
  return 1 + text + patches + a * audio_in + (0 if said_text is None else len(said_text)) + a * audio_out


def num_patches(mt: MicroTurn) -> int:
  return 0 if mt.frame is None else patches_per_frame(*mt.frame.shape[:2])


def num_positions(mt: MicroTurn) -> int:
  return micro_turn_size(
    [*mt.bg_results, *mt.typed_text], num_patches(mt), mt.heard is not None, mt.said_text, mt.said_mel is not None
  )


def _audio(x: np.ndarray, f: int, mt: MicroTurn, field: str) -> np.ndarray:
  """[4F, M] (or [4, F, M]) → [4, F, M], naming the field and micro-turn when the size is wrong."""
  x = np.asarray(x)
  a = AUDIO_POSITIONS_PER_MICRO_TURN
  if x.size != a * f * NUM_MELS:
    raise ValueError(
      f"micro-turn {mt.index}: field {field!r} is {list(x.shape)}; want [{a * f}, {NUM_MELS}] "
      f"({a} audio positions of {f} frames)"
    )
  return x.reshape(a, f, NUM_MELS)


def write(row: dict[str, np.ndarray], mt: MicroTurn, pos: int, patch: int) -> tuple[int, int]:
  """Writes `mt` into a packed row (`RowSpec.empty_row()`: tokens, kind, dmel, mel, patch_index,
  patches, patch_rowcol, micro_turn) from position `pos`, its patches from slot `patch`; returns
  the next free position and patch slot.

  Positions the layout leaves at 0 (tokens of non-text positions, dmel and mel of non-audio
  ones) are not written: `row` must be empty there. segment_ids and positions are per window
  (`write_window`).
  """
  a = AUDIO_POSITIONS_PER_MICRO_TURN
  f = row["dmel"].shape[-2]
  begin = pos
  row["tokens"][pos] = _MT
  row["kind"][pos] = Kind.MT
  pos += 1
  for (open_, close), spans in ((_BG_RESULT, mt.bg_results), (_USER_TEXT, mt.typed_text)):
    for ids in spans:
      end = pos + len(ids) + 1
      row["tokens"][pos] = open_
      row["tokens"][pos + 1 : end] = ids
      row["tokens"][end] = close
      row["kind"][pos : end + 1] = Kind.TEXT_IN
      pos = end + 1
  if mt.frame is not None:
    patches, rowcol = video.patchify(mt.frame)
    p = len(patches)
    row["patches"][patch : patch + p] = patches
    row["patch_rowcol"][patch : patch + p] = rowcol
    row["patch_index"][pos : pos + p] = np.arange(patch, patch + p)
    row["kind"][pos : pos + p] = Kind.PATCH
    pos += p
    patch += p
  if mt.heard is not None:
    row["kind"][pos : pos + a] = Kind.AUDIO_IN
    row["dmel"][pos : pos + a] = _audio(mt.heard, f, mt, "heard")
    pos += a
  if mt.said_text is not None:
    row["tokens"][pos : pos + len(mt.said_text)] = mt.said_text
    row["kind"][pos : pos + len(mt.said_text)] = Kind.TEXT_OUT
    pos += len(mt.said_text)
  if mt.said_mel is not None:
    mel = _audio(mt.said_mel, f, mt, "said_mel")
    row["kind"][pos : pos + a] = Kind.AUDIO_OUT
    row["dmel"][pos : pos + a] = said_bins(mel) if mt.said_dmel is None else _audio(mt.said_dmel, f, mt, "said_dmel")
    row["mel"][pos : pos + a] = mel
    pos += a
  row["micro_turn"][begin:pos] = mt.index
  return pos, patch


def write_window(
  row: dict[str, np.ndarray], micro_turns: Sequence[MicroTurn], segment: int, pos: int, patch: int
) -> tuple[int, int]:
  """Writes consecutive micro-turns as segment `segment` of `row` (positions from 0) from position
  `pos` and patch slot `patch`; returns the next free position and patch slot."""
  first = pos
  for mt in micro_turns:
    pos, patch = write(row, mt, pos, patch)
  row["segment_ids"][first:pos] = segment
  row["positions"][first:pos] = np.arange(pos - first)
  return pos, patch


def positions(mt: MicroTurn, frames_per_position: int) -> Positions:
  """`mt` laid out on its own: `write` into a block of exactly its positions and patches."""
  n, p, f = num_positions(mt), num_patches(mt), frames_per_position
  block = {
    "tokens": np.zeros(n, np.int32),
    "kind": np.zeros(n, np.int8),
    "dmel": np.zeros((n, f, NUM_MELS), np.uint8),
    "mel": np.zeros((n, f, NUM_MELS), np.float16),
    "patch_index": np.full(n, -1, np.int32),
    "patches": np.zeros((p, PATCH_SIZE, PATCH_SIZE, 3), np.uint8),
    "patch_rowcol": np.zeros((p, 2), np.int16),
    "micro_turn": np.zeros(n, np.int32),
  }
  write(block, mt, 0, 0)
  del block["micro_turn"]
  return Positions(**block)


def window_micro_turns(
  layout: Layout, media: Span | Episode, start: int, length: int, *, causal: bool
) -> list[MicroTurn]:
  """Micro-turns start .. start + length - 1 of an aligned episode (`align.align`), with their
  inputs and reference outputs.

  `media` is the episode's media: the chunks covering windows start - 1 .. start + length + 1
  (`EpisodeReader.span`; causal dMel reads a little audio before a window, centered a little
  after), or the whole `Episode`. Audio features are computed for the whole window in one call and
  then split: `data_pipelines.dmel` keeps each frame bitwise independent of the crop, so a
  micro-turn's features do not depend on the window it was cut with.
  """
  if isinstance(media, Episode):
    media = Span(media.user_audio, media.model_audio, 0, media.frames, 0)
  if not 0 <= start <= start + length <= len(layout):
    raise ValueError(f"micro-turns [{start}, {start + length}) are not within the episode's {len(layout)}")
  heard: Sequence[np.ndarray | None] = [None] * length
  said: Sequence[np.ndarray | None] = [None] * length
  said_dmel: Sequence[np.ndarray | None] = [None] * length
  if layout.has_audio:
    if media.user_audio is None or media.model_audio is None:
      raise ValueError("the episode is aligned with audio, but its media has none")
    frames = FRAMES_PER_MICRO_TURN * length
    origin = media.sample_offset // dmel.HOP_LENGTH  # the episode frame the media's audio starts at
    frame0 = FRAMES_PER_MICRO_TURN * start - origin
    heard = dmel.dmel_bins(
      media.user_audio, causal=causal, start_frame=frame0, num_frames=frames, origin_frame=origin
    ).reshape(length, FRAMES_PER_MICRO_TURN, NUM_MELS)
    # O_t speaks window t + 1.
    spoken = dmel.log_mel(
      media.model_audio,
      causal=causal,
      start_frame=frame0 + FRAMES_PER_MICRO_TURN,
      num_frames=frames,
      origin_frame=origin,
    )
    said = dmel.normalize(spoken).astype(np.float16).reshape(length, FRAMES_PER_MICRO_TURN, NUM_MELS)
    said_dmel = said_bins(said)
  out = []
  for i, t in enumerate(range(start, start + length)):
    frame = None if layout.frame[t] < 0 else media.frames[layout.frame[t] - media.frame_offset]
    out.append(
      MicroTurn(
        index=t,
        bg_results=layout.bg_results[t],
        typed_text=layout.typed_text[t],
        frame=frame,
        heard=heard[i],
        said_text=layout.out_text[t],
        said_mel=said[i],
        said_dmel=said_dmel[i],
      )
    )
  return out


def episode_micro_turns(episode: Episode, layout: Layout, *, causal: bool) -> list[MicroTurn]:
  """Every micro-turn of a whole episode (`EpisodeReader.read(i)`, aligned by `align.align`)."""
  return window_micro_turns(layout, episode, 0, len(layout), causal=causal)
