"""What an episode holds: `Episode`, its `Word`s and `Event`s, and `validate`, what a valid one is.

An episode holds both speakers' audio (16 kHz), optional video frames with their times, word-timed
text per speaker, optional typed user text and optional background-model calls and results, each
with times in seconds from the start of the episode. A text-only episode has no audio and no video;
its duration comes from its text times, with no gap longer than MAX_TEXT_GAP_SECONDS between 0, its
word and event times and its duration (so its micro-turns are bounded by its text).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE
from data_pipelines.episode.errors import DataError

MAX_TEXT_GAP_SECONDS = 60.0  # longest stretch of a text-only episode without a word or event
AUDIO_DTYPES = ("<i2", "<f4")  # int16, or float32 in [-1, 1]


@dataclasses.dataclass(frozen=True)
class Word:
  start: float
  end: float
  text: str


@dataclasses.dataclass(frozen=True)
class Event:
  time: float
  text: str


@dataclasses.dataclass
class Episode:
  """One conversation. Audio is int16 (or float32 in [-1, 1]) at 16 kHz; times are in seconds."""

  id: str
  duration: float
  user_audio: np.ndarray | None = None
  model_audio: np.ndarray | None = None
  frames: np.ndarray | None = None
  frame_times: np.ndarray | None = None
  user_words: list[Word] = dataclasses.field(default_factory=list)
  model_words: list[Word] = dataclasses.field(default_factory=list)
  typed_text: list[Event] = dataclasses.field(default_factory=list)
  bg_calls: list[Event] = dataclasses.field(default_factory=list)
  bg_results: list[Event] = dataclasses.field(default_factory=list)
  meta: dict[str, str] = dataclasses.field(default_factory=dict)
  sample_rate: int = SAMPLE_RATE

  @property
  def has_audio(self) -> bool:
    return self.user_audio is not None

  @property
  def has_video(self) -> bool:
    return self.frames is not None and len(self.frames) > 0

  @property
  def frame_shape(self) -> tuple[int, int, int] | None:
    return None if self.frames is None else tuple(self.frames.shape[1:])

  @property
  def num_windows(self) -> int:
    """Whole 200 ms windows in the episode."""
    return int(math.floor(self.duration / MICRO_TURN_SECONDS + 1e-9))

  @property
  def num_micro_turns(self) -> int:
    """Trainable micro-turns: I_t reads window t and O_t window t+1, so the last window has no I."""
    return max(self.num_windows - 1, 0)


def check_audio_values(audio: np.ndarray, where: str, name: str) -> None:
  """Float audio must be finite and in [-1, 1]; raises DataError naming field `name`."""
  if audio.dtype.kind == "f":
    bad = ~np.isfinite(audio)
    if bad.any():
      i = int(np.argmax(bad))
      raise DataError("non_finite", where, f"field {name!r} has {int(bad.sum())} NaN/Inf samples (first at {i})")
    if np.abs(audio).max(initial=0) > 1.0:
      raise DataError("audio_range", where, f"field {name!r} is float audio outside [-1, 1]")


def validate(ep: Episode, where: str) -> None:
  """Checks sample rate, lengths, finite audio, timestamps and text; raises DataError naming the field."""
  if (ep.user_audio is None) != (ep.model_audio is None):
    raise DataError("length", where, "fields 'user_audio' and 'model_audio' must both be present or both absent")
  if ep.user_audio is not None:
    for name in ("user_audio", "model_audio"):
      audio = getattr(ep, name)
      if audio.ndim != 1 or audio.dtype.str not in AUDIO_DTYPES:
        raise DataError(
          "schema", where, f"field {name!r} is {audio.dtype}{list(audio.shape)}; want 1-D int16 or float32"
        )
    if len(ep.user_audio) != len(ep.model_audio) or ep.user_audio.dtype != ep.model_audio.dtype:
      raise DataError(
        "length",
        where,
        f"fields 'user_audio' ({ep.user_audio.dtype}[{len(ep.user_audio)}]) and 'model_audio' "
        f"({ep.model_audio.dtype}[{len(ep.model_audio)}]) differ",
      )
  if ep.frames is not None or ep.frame_times is not None:
    if ep.frames is None or ep.frame_times is None:
      raise DataError("length", where, "fields 'frames' and 'frame_times' must both be present or both absent")
    if ep.frames.ndim != 4 or ep.frames.shape[-1] != 3 or ep.frames.dtype != np.uint8:
      raise DataError(
        "schema", where, f"field 'frames' is {ep.frames.dtype}{list(ep.frames.shape)}; want uint8 [T,H,W,3]"
      )
  check_timing(
    ep,
    where,
    num_samples=None if ep.user_audio is None else len(ep.user_audio),
    num_frames=None if ep.frames is None else len(ep.frames),
  )
  _check_text(ep, where)
  if ep.user_audio is not None:
    for name in ("user_audio", "model_audio"):
      check_audio_values(getattr(ep, name), where, name)


def check_timing(ep: Episode, where: str, num_samples: int | None, num_frames: int | None) -> None:
  """Sample rate, duration against the audio length, frame count and every time field."""
  if ep.sample_rate != SAMPLE_RATE:
    raise DataError("sample_rate", where, f"field 'sample_rate' is {ep.sample_rate}; episodes are {SAMPLE_RATE} Hz")
  if not (math.isfinite(ep.duration) and ep.duration > 0):
    raise DataError("length", where, f"field 'duration' is {ep.duration}; it must be a positive number of seconds")
  if num_samples is not None:
    want = ep.duration * SAMPLE_RATE
    want = round(want) if math.isfinite(want) else want
    if not abs(num_samples - want) <= 1:
      raise DataError("length", where, f"the audio has {num_samples} samples; 'duration' {ep.duration} s means {want}")
  if num_frames is not None or ep.frame_times is not None:
    times = 0 if ep.frame_times is None else len(ep.frame_times)
    if num_frames != times:
      raise DataError("length", where, f"field 'frames' has {num_frames} frames but 'frame_times' has {times}")
    _check_times(ep.frame_times.tolist(), ep.duration, where, "frame_times", strict=True)
  for name in ("user_words", "model_words"):
    words = getattr(ep, name)
    for i, w in enumerate(words):
      if not w.start <= w.end:
        raise DataError(
          "timestamps", where, f"field {name!r}[{i}] ({w.text!r}) starts at {w.start} after its end {w.end}"
        )
    _check_times([w.start for w in words], ep.duration, where, name)
    _check_times([w.end for w in words], ep.duration, where, name)
  for name in ("typed_text", "bg_calls", "bg_results"):
    _check_times([e.time for e in getattr(ep, name)], ep.duration, where, name)
  if num_samples is None and num_frames is None:
    _check_text_gaps(ep, where)


def _check_text(ep: Episode, where: str) -> None:
  """Every word and event text must be encodable as UTF-8 (a lone surrogate is not), as tokenizers need."""
  for name in ("user_words", "model_words", "typed_text", "bg_calls", "bg_results"):
    for i, item in enumerate(getattr(ep, name)):
      try:
        item.text.encode("utf-8")
      except UnicodeEncodeError:
        raise DataError(
          "transcript", where, f"field {name!r}[{i}] text {item.text!r} is not valid Unicode (a lone surrogate)"
        ) from None


def _check_text_gaps(ep: Episode, where: str) -> None:
  """A text-only episode's duration comes from its text: no gap between 0, its word and event
  times and its duration may pass MAX_TEXT_GAP_SECONDS, so its micro-turns are bounded by its text."""
  marks = [(w.start, name, i) for name in ("user_words", "model_words") for i, w in enumerate(getattr(ep, name))]
  marks += [(w.end, name, i) for name in ("user_words", "model_words") for i, w in enumerate(getattr(ep, name))]
  marks += [
    (e.time, name, i) for name in ("typed_text", "bg_calls", "bg_results") for i, e in enumerate(getattr(ep, name))
  ]
  marks.sort(key=lambda m: m[0])
  prev = 0.0
  for t, name, i in marks:
    if t - prev > MAX_TEXT_GAP_SECONDS:
      raise DataError(
        "schema",
        where,
        f"field {name!r}[{i}] at {t} s comes {t - prev:g} s after the text before it; a text-only episode has "
        f"no gap over {MAX_TEXT_GAP_SECONDS:g} s",
      )
    prev = t
  if ep.duration - prev > MAX_TEXT_GAP_SECONDS:
    raise DataError(
      "schema",
      where,
      f"field 'duration' is {ep.duration} s, {ep.duration - prev:g} s after its last text (at {prev} s); a text-only "
      f"episode ends within {MAX_TEXT_GAP_SECONDS:g} s of it",
    )


def _check_times(times: list[float], duration: float, where: str, field: str, strict: bool = False) -> None:
  prev = -math.inf
  for i, t in enumerate(times):
    if not (math.isfinite(t) and 0.0 <= t <= duration + 1e-6):
      raise DataError("timestamps", where, f"field {field!r}[{i}] time {t} is outside the episode [0, {duration}] s")
    if t < prev or (strict and t == prev):
      raise DataError("timestamps", where, f"field {field!r}[{i}] time {t} comes before the previous one {prev}")
    prev = t
