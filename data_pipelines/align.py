"""Alignment of an episode into micro-turns (MODEL_SPEC.md §3), without touching its audio.

Micro-turn t reads window t (200 ms) of the user stream and writes window t+1 of the model
stream:

    I_t  <mt>  [<bg_result> .. </bg_result>]*  [<user_text> .. </user_text>]*  [PATCH x P]  [AUDIO_IN x 4]
    O_t  TEXT_OUT x k  <eot>  [AUDIO_OUT x 4]

An event belongs to the window its time falls in: background results and typed text of window t
go to I_t; the model's words (by start time) and `<bg_call>` spans of window t+1 go to O_t, at
most K_max tokens per micro-turn, the overflow carried to the next micro-turn. The video frame of
window t is the first frame whose time falls in it. Text-only episodes (no audio) have no audio
positions and use their own K_max, since text read at a reading rate is denser than speech.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS, patches_per_frame, special_id
from data_pipelines.episode import DataError, Episode, EpisodeHeader
from data_pipelines.microturn import micro_turn_size
from data_pipelines.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class AlignSpec:
  """Static alignment settings (config `data`)."""

  k_max: int
  text_only_k_max: int
  frame_height: int
  frame_width: int
  vocab_size: int

  @property
  def patches_per_frame(self) -> int:
    return patches_per_frame(self.frame_height, self.frame_width)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Token-level layout of every micro-turn of one episode.

  `bg_results[t]` and `typed_text[t]` are the token ids of each background result and typed text
  of I_t (without the special tokens around them, which `data_pipelines.microturn` adds),
  `out_text[t]` the TEXT_OUT tokens of O_t ending with `<eot>`, `frame[t]` the index of window t's
  frame in `episode.frames` (-1: none) and `sizes[t]` the positions micro-turn t takes.
  `carried_over` counts tokens still waiting for room when the episode ends (they are not in any
  micro-turn).
  """

  bg_results: list[list[list[int]]]
  typed_text: list[list[list[int]]]
  out_text: list[list[int]]
  frame: np.ndarray
  sizes: np.ndarray
  has_audio: bool
  patches_per_frame: int
  carried_over: int

  def __len__(self) -> int:
    return len(self.sizes)


def window_of(time: float) -> int:
  """The 200 ms window a time in seconds falls in (robust to float error at the boundaries)."""
  return int(math.floor(time / MICRO_TURN_SECONDS + 1e-6))


def align(ep: Episode | EpisodeHeader, tokenizer: Tokenizer, spec: AlignSpec, where: str) -> Layout:
  """Lays out every micro-turn of `ep`; raises DataError naming `where` for tokens past the vocab
  or frames of the wrong size."""
  n = ep.num_micro_turns
  eot = special_id("<eot>")

  def encode(text: str, field: str) -> list[int]:
    ids = tokenizer.encode(text)
    if ids and max(ids) >= spec.vocab_size:
      raise DataError(
        "token_range",
        where,
        f"field {field!r}: text {text!r} has token id {max(ids)} >= model.vocab_size={spec.vocab_size} "
        "(is data.tokenizer the one the model was built for?)",
      )
    return ids

  bg_results: list[list[list[int]]] = [[] for _ in range(n)]
  typed_text: list[list[list[int]]] = [[] for _ in range(n)]
  for events, name, spans in ((ep.bg_results, "bg_results", bg_results), (ep.typed_text, "typed_text", typed_text)):
    for e in events:
      t = window_of(e.time)
      if t < n:
        spans[t].append(encode(e.text, name))

  # Model text by output window: words (a space before all but the first) and <bg_call> spans.
  arrivals: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(n + 1)]
  for i, w in enumerate(ep.model_words):
    t = window_of(w.start)
    if t <= n:
      arrivals[t].append((w.start, 0, encode(w.text if i == 0 else " " + w.text, "model_words")))
  for e in ep.bg_calls:
    t = window_of(e.time)
    if t <= n:
      arrivals[t].append((e.time, 1, [special_id("<bg_call>"), *encode(e.text, "bg_calls"), special_id("</bg_call>")]))
  k_max = spec.k_max if ep.has_audio else spec.text_only_k_max
  out_text: list[list[int]] = []
  queue: list[int] = []  # tokens that arrived, sent up to `sent`: linear in the text, however long it waits
  sent = 0
  for t in range(n):
    for _, _, ids in sorted(arrivals[t + 1], key=lambda a: (a[0], a[1])):
      queue += ids
    out_text.append([*queue[sent : sent + k_max], eot])
    sent = min(sent + k_max, len(queue))

  frame = np.full(n, -1, np.int32)
  ppf = 0
  if ep.has_video:
    h, w = ep.frame_shape[:2]
    if (h, w) != (spec.frame_height, spec.frame_width):
      raise DataError(
        "frame_size",
        where,
        f"field 'frames' is {h}x{w} pixels; config data.frame_height x data.frame_width is "
        f"{spec.frame_height}x{spec.frame_width} (rebuild the dataset or change the config)",
      )
    ppf = spec.patches_per_frame
    for i, ft in enumerate(ep.frame_times):
      t = window_of(float(ft))
      if t < n and frame[t] < 0:
        frame[t] = i

  sizes = np.array(
    [
      micro_turn_size(
        [*bg_results[t], *typed_text[t]], ppf if frame[t] >= 0 else 0, ep.has_audio, out_text[t], ep.has_audio
      )
      for t in range(n)
    ],
    np.int64,
  )
  return Layout(bg_results, typed_text, out_text, frame, sizes, ep.has_audio, ppf, len(queue) - sent)
