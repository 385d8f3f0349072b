"""Episodes: one recorded conversation, stored as a run of ArrayRecord records (no pickle).

An episode holds both speakers' audio (16 kHz), optional video frames with their times, word-timed
text per speaker, optional typed user text and optional background-model calls and results, each
with times in seconds from the start of the episode. A text-only episode has no audio and no video;
its duration comes from its text times.

An episode is stored as one header record followed by chunk records, each chunk holding the media
of `chunk_windows` 200 ms windows (5 s by default), so that a training window reads only the
chunks it covers, however long the conversation. Every record has the same layout, schema
version 1 (all integers little-endian):

    bytes 0..7    magic b"TMLXEPI1"
    bytes 8..11   uint32 H, the header length
    H bytes       UTF-8 JSON header (below)
    the rest      the payload: each array's raw C-order bytes, at the offset its header entry gives

    header record = {
      "schema": 1, "kind": "episode",
      "id": str,                    # unique within a dataset, e.g. the source file stem
      "sample_rate": 16000,
      "duration": float,            # seconds
      "media": {"num_samples": N (0: no audio), "audio_dtype": "<i2" | "<f4" (in [-1, 1]) | null,
                "frame_shape": [H, W, 3] | null, "chunk_windows": int, "chunks": C},
      "user_words" / "model_words": [[start, end, text], ...]   # start <= end, starts non-decreasing
      "typed_text" / "bg_calls" / "bg_results": [[time, text], ...]   # times non-decreasing
      "meta": {str: str},           # provenance (source files, builder), free-form
      "arrays": {"frame_times": {"dtype": "<f8", "shape": [T], "offset": 0}},   # video only; increasing
    }
    chunk record k (k = 0 .. C-1) = {
      "schema": 1, "kind": "chunk", "id": str, "chunk": k,
      "arrays": {name: {"dtype": numpy dtype str, "shape": [..], "offset": int}},
          # user_audio, model_audio: samples [k·S, (k+1)·S) with S = chunk_windows · 3200
          # frames: [n, H, W, 3] "|u1" RGB, the frames whose time falls in the chunk's windows
    }

A dataset directory holds `episodes-XXXXX-of-YYYYY.array_record` shards and `manifest.json`, which
lists every episode's shard, first record, record count, id, micro-turn count and whether it has
audio and video, so that a pipeline can plan crops without reading any media.

A reader trusts no number it has not checked against what the records hold, so that what it
allocates is bounded by the records themselves: shard names stay inside the dataset directory, an
episode's records lie inside its shard, C + 1 of them; C is what the writer lays out, ceil(N / S)
(at least 1) chunks for N samples, else ceil(windows / chunk_windows) (at least 1) with video, else
0; 1 <= chunk_windows <= MAX_CHUNK_WINDOWS; N is 0 without an audio dtype and within a sample of
duration x 16000 with one; a text-only episode has no gap longer than MAX_TEXT_GAP_SECONDS between
0, its word and event times and its duration (so its micro-turns are bounded by its text); the
manifest's micro-turn count is the header's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE, SAMPLES_PER_MICRO_TURN
from tmlx import paths

SCHEMA_VERSION = 1
MAGIC = b"TMLXEPI1"
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per ArrayRecord chunk: random access reads one record
DEFAULT_CHUNK_SECONDS = 5.0
MAX_CHUNK_WINDOWS = 300  # 60 s: a reader reads whole chunks, so a chunk bounds what one read loads
MAX_TEXT_GAP_SECONDS = 60.0  # longest stretch of a text-only episode without a word or event

_AUDIO_DTYPES = ("<i2", "<f4")

# Why an input was rejected: the keys of the per-reason skip counters of builders and pipelines.
SKIP_REASONS = (
  "schema",  # not a tmlx episode, or a malformed header or manifest
  "corrupt",  # unreadable ArrayRecord shard or chunk
  "audio",  # unreadable audio file, or the wrong number of channels
  "missing",  # half of a user/model pair of files is missing
  "empty",  # a document or recording with nothing in it
  "sample_rate",
  "length",  # audio lengths disagree with each other or with the duration
  "non_finite",  # NaN/Inf audio samples
  "audio_range",  # float audio outside [-1, 1]
  "timestamps",  # out of range or not monotonic
  "token_range",  # a token id >= model.vocab_size
  "frame_size",  # video frames not of the configured size
  "transcript",  # unparseable transcript
  "video",  # undecodable video file
  "duplicate",  # two episodes with one id
  "truncated",  # a media file holding fewer samples or frames than its header promises
)


class DataError(ValueError):
  """Bad input data. `reason` (one of SKIP_REASONS) keys skip counters; the message names where and what."""

  def __init__(self, reason: str, where: str, message: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f"DataError reason {reason!r} is not one of {SKIP_REASONS}")
    super().__init__(f"{where}: {message}")
    self.reason = reason
    self.where = where


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


def _pack(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
  """One record: magic, header length, JSON header (with the arrays' layout), payload."""
  layout, payload, offset = {}, [], 0
  for name, arr in arrays.items():
    arr = np.ascontiguousarray(arr)
    layout[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
    data = arr.tobytes()
    pad = -len(data) % 8
    payload.append(data + b"\0" * pad)
    offset += len(data) + pad
  head = json.dumps({"schema": SCHEMA_VERSION, **header, "arrays": layout}, separators=(",", ":")).encode()
  return MAGIC + struct.pack("<I", len(head)) + head + b"".join(payload)


def _unpack(data: bytes, where: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Parses one record of `kind` ('episode' or 'chunk'); arrays are views of `data`."""
  if len(data) < 12 or data[:8] != MAGIC:
    raise DataError("schema", where, f"not a tmlx episode record (magic {data[:8]!r}, want {MAGIC!r})")
  (h,) = struct.unpack("<I", data[8:12])
  try:
    header = json.loads(data[12 : 12 + h])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError("schema", where, f"header is not valid JSON: {e}") from None
  if not isinstance(header, dict) or not isinstance(header.get("arrays", {}), dict):
    raise DataError("schema", where, "the header (and its field 'arrays') must be a JSON object")
  if header.get("schema") != SCHEMA_VERSION:
    raise DataError("schema", where, f"field 'schema' is {header.get('schema')!r}; this reader reads {SCHEMA_VERSION}")
  if header.get("kind") != kind:
    raise DataError("schema", where, f"field 'kind' is {header.get('kind')!r}; want {kind!r} here")
  body = memoryview(data)[12 + h :]
  arrays = {}
  for name, info in header.get("arrays", {}).items():
    try:
      dtype = np.dtype(info["dtype"])
      shape = tuple(int(n) for n in info["shape"])
      if min(shape, default=0) < 0:
        raise ValueError(f"shape {list(shape)} has a negative size")
      count = math.prod(shape)
      start = int(info["offset"])
      if start < 0 or start + count * dtype.itemsize > len(body):
        raise ValueError(f"needs bytes [{start}, {start + count * dtype.itemsize}) of a {len(body)}-byte payload")
      arrays[name] = np.frombuffer(body, dtype, count, start).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
      raise DataError("schema", where, f"array {name!r}: {e}") from None
  return header, arrays


@dataclasses.dataclass(frozen=True)
class Media:
  """What an episode record says about its media, which its chunk records hold."""

  num_samples: int  # per channel; 0 without audio
  audio_dtype: str | None
  frame_shape: tuple[int, int, int] | None  # (H, W, 3); None without video
  chunk_windows: int
  chunks: int

  def chunk_of_frame(self, time: float) -> int:
    return min(int(math.floor(time / MICRO_TURN_SECONDS + 1e-6)) // self.chunk_windows, self.chunks - 1)


@dataclasses.dataclass
class EpisodeHeader:
  """An episode without its media: text, events, frame times and the media's shape. It has the
  attributes that alignment reads, like a full `Episode`."""

  episode: Episode  # with user_audio, model_audio and frames absent
  media: Media

  def __getattr__(self, name):
    return getattr(self.episode, name)

  @property
  def has_audio(self) -> bool:
    return self.media.num_samples > 0

  @property
  def has_video(self) -> bool:
    return self.media.frame_shape is not None and self.frame_times is not None and len(self.frame_times) > 0

  @property
  def frame_shape(self) -> tuple[int, int, int] | None:
    return self.media.frame_shape


def episode_records(ep: Episode, chunk_seconds: float = DEFAULT_CHUNK_SECONDS) -> list[bytes]:
  """The records of one episode: its header record, then one chunk record per `chunk_seconds`."""
  windows = max(1, round(chunk_seconds / MICRO_TURN_SECONDS))
  if windows > MAX_CHUNK_WINDOWS:
    raise ValueError(
      f"chunk_seconds={chunk_seconds}: a chunk holds at most {MAX_CHUNK_WINDOWS * MICRO_TURN_SECONDS:g} s"
    )
  span = windows * SAMPLES_PER_MICRO_TURN
  chunks = _chunk_count(
    None if ep.user_audio is None else len(ep.user_audio), ep.num_windows, ep.frames is not None, windows
  )
  media = Media(
    num_samples=0 if ep.user_audio is None else len(ep.user_audio),
    audio_dtype=None if ep.user_audio is None else ep.user_audio.dtype.str,
    frame_shape=None if ep.frames is None else tuple(int(n) for n in ep.frames.shape[1:]),
    chunk_windows=windows,
    chunks=chunks,
  )
  header = {
    "kind": "episode",
    "id": ep.id,
    "sample_rate": ep.sample_rate,
    "duration": float(ep.duration),
    "media": dataclasses.asdict(media),
    "user_words": [[w.start, w.end, w.text] for w in ep.user_words],
    "model_words": [[w.start, w.end, w.text] for w in ep.model_words],
    "typed_text": [[e.time, e.text] for e in ep.typed_text],
    "bg_calls": [[e.time, e.text] for e in ep.bg_calls],
    "bg_results": [[e.time, e.text] for e in ep.bg_results],
    "meta": {str(k): str(v) for k, v in ep.meta.items()},
  }
  arrays = {} if ep.frame_times is None else {"frame_times": np.asarray(ep.frame_times, "<f8")}
  records = [_pack(header, arrays)]
  frame_chunk = (
    np.array([media.chunk_of_frame(float(t)) for t in ep.frame_times]) if ep.frame_times is not None else None
  )
  for k in range(chunks):
    arrays = {}
    if ep.has_audio:
      arrays["user_audio"] = ep.user_audio[k * span : (k + 1) * span]
      arrays["model_audio"] = ep.model_audio[k * span : (k + 1) * span]
    if ep.frames is not None:
      arrays["frames"] = ep.frames[frame_chunk == k]
    records.append(_pack({"kind": "chunk", "id": ep.id, "chunk": k}, arrays))
  return records


def _chunk_count(num_samples: int | None, num_windows: int, video: bool, chunk_windows: int) -> int:
  """The chunks the writer lays out: audio in spans of `chunk_windows` windows, else the windows of
  a video, else none."""
  if num_samples is not None:
    return max(1, -(-num_samples // (chunk_windows * SAMPLES_PER_MICRO_TURN)))
  if video:
    return max(1, -(-num_windows // chunk_windows))
  return 0


def _check_media(ep: Episode, media: Media, where: str) -> None:
  """The media layout against itself and the duration, as the writer lays it out, before any
  number in it sizes anything."""
  if not 1 <= media.chunk_windows <= MAX_CHUNK_WINDOWS:
    raise DataError(
      "schema", where, f"field 'media.chunk_windows' is {media.chunk_windows}; a chunk holds 1 to {MAX_CHUNK_WINDOWS}"
    )
  if media.audio_dtype is not None and media.audio_dtype not in _AUDIO_DTYPES:
    raise DataError("schema", where, f"field 'media.audio_dtype' is {media.audio_dtype!r}; want int16 or float32")
  if media.num_samples < 0 or (media.audio_dtype is None and media.num_samples != 0):
    raise DataError(
      "schema",
      where,
      f"field 'media.num_samples' is {media.num_samples} with 'media.audio_dtype' {media.audio_dtype!r}; "
      "want 0 without audio, a count with it",
    )
  shape = media.frame_shape
  if shape is not None and (len(shape) != 3 or shape[2] != 3 or min(shape) < 0):
    raise DataError("schema", where, f"field 'media.frame_shape' is {list(shape)}; want [H, W, 3]")
  times = ep.frame_times
  if (shape is None) != (times is None):
    raise DataError(
      "schema",
      where,
      f"field 'media.frame_shape' is {shape} but array 'frame_times' is {'absent' if times is None else 'present'}",
    )
  if times is not None and (times.dtype.str != "<f8" or times.ndim != 1):
    raise DataError("schema", where, f"array 'frame_times' is {times.dtype}{list(times.shape)}; want <f8 [T]")
  if not (math.isfinite(ep.duration) and ep.duration > 0):
    return  # _validate_timing names it
  audio = None if media.audio_dtype is None else media.num_samples
  want = _chunk_count(audio, ep.num_windows, shape is not None, media.chunk_windows)
  if media.chunks != want:
    if audio is not None:
      raise DataError(
        "schema",
        where,
        f"field 'media.num_samples' is {audio}, {want} chunks of {media.chunk_windows} windows; "
        f"field 'media.chunks' is {media.chunks}",
      )
    raise DataError(
      "schema",
      where,
      f"field 'media.chunks' is {media.chunks}; "
      + (
        f"'duration' {ep.duration} s is {want} chunks of {media.chunk_windows} windows"
        if shape is not None
        else "a text-only episode has none"
      ),
    )


def _parse_header(data: bytes, where: str) -> EpisodeHeader:
  header, arrays = _unpack(data, where, "episode")
  try:
    m = header["media"]
    media = Media(
      num_samples=int(m["num_samples"]),
      audio_dtype=None if m["audio_dtype"] is None else str(m["audio_dtype"]),
      frame_shape=None if m["frame_shape"] is None else tuple(int(n) for n in m["frame_shape"]),
      chunk_windows=int(m["chunk_windows"]),
      chunks=int(m["chunks"]),
    )
    ep = Episode(
      id=str(header["id"]),
      duration=float(header["duration"]),
      sample_rate=int(header["sample_rate"]),
      frame_times=arrays.get("frame_times"),
      user_words=[Word(float(s), float(e), str(t)) for s, e, t in header.get("user_words", [])],
      model_words=[Word(float(s), float(e), str(t)) for s, e, t in header.get("model_words", [])],
      typed_text=[Event(float(t), str(x)) for t, x in header.get("typed_text", [])],
      bg_calls=[Event(float(t), str(x)) for t, x in header.get("bg_calls", [])],
      bg_results=[Event(float(t), str(x)) for t, x in header.get("bg_results", [])],
      meta=dict(header.get("meta", {})),
    )
  except (KeyError, TypeError, ValueError, OverflowError) as e:
    raise DataError("schema", where, f"malformed header field: {e!r}") from None
  _check_media(ep, media, where)
  _validate_timing(
    ep,
    where,
    num_samples=media.num_samples if media.audio_dtype is not None else None,
    num_frames=None if media.frame_shape is None else (0 if ep.frame_times is None else len(ep.frame_times)),
  )
  return EpisodeHeader(ep, media)


@dataclasses.dataclass(frozen=True)
class Span:
  """Media of whole chunks of an episode: samples from `sample_offset`, frames from `frame_offset`."""

  user_audio: np.ndarray | None
  model_audio: np.ndarray | None
  sample_offset: int
  frames: np.ndarray | None
  frame_offset: int


def _check_chunk(data: bytes, where: str, head: EpisodeHeader, k: int) -> dict[str, np.ndarray]:
  header, arrays = _unpack(data, where, "chunk")
  if header.get("id") != head.id or header.get("chunk") != k:
    raise DataError(
      "schema", where, f"chunk record of {header.get('id')!r} #{header.get('chunk')}, want {head.id!r} #{k}"
    )
  m = head.media
  if m.audio_dtype is not None:
    span = m.chunk_windows * SAMPLES_PER_MICRO_TURN
    want = min(span, m.num_samples - k * span)
    for name in ("user_audio", "model_audio"):
      audio = arrays.get(name)
      if audio is None or audio.dtype.str != m.audio_dtype or audio.shape != (want,):
        got = "absent" if audio is None else f"{audio.dtype}{list(audio.shape)}"
        raise DataError("length", where, f"field {name!r} of chunk {k} is {got}; want {m.audio_dtype}[{want}]")
      _check_audio_values(audio, where, name)
  if m.frame_shape is not None:
    want = int(sum(m.chunk_of_frame(float(t)) == k for t in head.frame_times))
    frames = arrays.get("frames")
    if frames is None or frames.dtype != np.uint8 or frames.shape != (want, *m.frame_shape):
      got = "absent" if frames is None else f"{frames.dtype}{list(frames.shape)}"
      raise DataError("length", where, f"field 'frames' of chunk {k} is {got}; want uint8{[want, *m.frame_shape]}")
  return arrays


def _check_audio_values(audio: np.ndarray, where: str, name: str) -> None:
  if audio.dtype.kind == "f":
    bad = ~np.isfinite(audio)
    if bad.any():
      i = int(np.argmax(bad))
      raise DataError("non_finite", where, f"field {name!r} has {int(bad.sum())} NaN/Inf samples (first at {i})")
    if np.abs(audio).max(initial=0) > 1.0:
      raise DataError("audio_range", where, f"field {name!r} is float audio outside [-1, 1]")


def validate(ep: Episode, where: str) -> None:
  """Checks sample rate, lengths, finite audio and timestamps; raises DataError naming the field."""
  if (ep.user_audio is None) != (ep.model_audio is None):
    raise DataError("length", where, "fields 'user_audio' and 'model_audio' must both be present or both absent")
  if ep.user_audio is not None:
    for name in ("user_audio", "model_audio"):
      audio = getattr(ep, name)
      if audio.ndim != 1 or audio.dtype.str not in _AUDIO_DTYPES:
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
  _validate_timing(
    ep,
    where,
    num_samples=None if ep.user_audio is None else len(ep.user_audio),
    num_frames=None if ep.frames is None else len(ep.frames),
  )
  if ep.user_audio is not None:
    for name in ("user_audio", "model_audio"):
      _check_audio_values(getattr(ep, name), where, name)


def _validate_timing(ep: Episode, where: str, num_samples: int | None, num_frames: int | None) -> None:
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


@dataclasses.dataclass(frozen=True)
class EpisodeInfo:
  """One manifest entry: the episode's records are `index` .. `index + records - 1` of `shard`."""

  shard: str
  index: int
  records: int
  id: str
  num_micro_turns: int
  has_audio: bool
  has_video: bool


def write_dataset(
  episodes: Iterable[Episode],
  out_dir: str | os.PathLike,
  episodes_per_shard: int = 64,
  chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
) -> list[EpisodeInfo]:
  """Writes episodes into ArrayRecord shards plus `manifest.json`; returns the manifest entries.

  Each episode is validated first (DataError names the episode id). Shards are written under a
  temporary name and renamed when complete, and the manifest is written last. ArrayRecord cannot
  write to object storage: an `out_dir` URL is written in a local temporary directory (room for the
  whole dataset) and then copied there, shards first and the manifest last.
  """
  if paths.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix="tmlx_dataset_") as tmp:
      entries = write_dataset(episodes, tmp, episodes_per_shard, chunk_seconds)
      names = json.loads((pathlib.Path(tmp) / MANIFEST).read_text())["shards"]
      for name in [*names, MANIFEST]:
        paths.upload(os.path.join(tmp, name), paths.join(out_dir, name))
    return entries
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  shards: list[list[Episode]] = [[]]
  seen = set()
  for ep in episodes:
    validate(ep, f"episode {ep.id!r}")
    if ep.id in seen:
      raise DataError("duplicate", f"episode {ep.id!r}", "another episode in this dataset has the same id")
    seen.add(ep.id)
    if len(shards[-1]) == episodes_per_shard:
      shards.append([])
    shards[-1].append(ep)
  entries = []
  n = len(shards)
  for s, group in enumerate(shards):
    name = f"episodes-{s:05d}-of-{n:05d}.array_record"
    tmp = out / (name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    index = 0
    for ep in group:
      records = episode_records(ep, chunk_seconds)
      for r in records:
        writer.write(r)
      entries.append(EpisodeInfo(name, index, len(records), ep.id, ep.num_micro_turns, ep.has_audio, ep.has_video))
      index += len(records)
    writer.close()
    os.replace(tmp, out / name)
  manifest = {
    "schema": SCHEMA_VERSION,
    "shards": [f"episodes-{s:05d}-of-{n:05d}.array_record" for s in range(n)],
    "episodes": [dataclasses.asdict(e) for e in entries],
  }
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return entries


def _check_shard_name(directory: pathlib.Path, shard, manifest: str, where: str) -> None:
  """A manifest's shard must be a relative path that stays inside the dataset directory, symlinks
  resolved."""
  if not isinstance(shard, str) or not shard:
    raise DataError("schema", manifest, f"malformed manifest: {where} has shard {shard!r}; want a file name")
  if pathlib.PurePath(shard).is_absolute() or ".." in pathlib.PurePath(shard).parts:
    why = "an absolute path" if pathlib.PurePath(shard).is_absolute() else "a path with '..'"
    raise DataError("schema", manifest, f"{where} has shard {shard!r} outside the dataset directory: {why}")
  if paths.is_remote(directory):  # no symlinks in object storage: the name decides
    return
  root = directory.resolve()
  target = (directory / shard).resolve()
  if root not in target.parents:
    raise DataError(
      "schema", manifest, f"{where} has shard {shard!r} outside the dataset directory: it resolves to {target}"
    )


class EpisodeReader:
  """Random access to a dataset directory's episodes by manifest position.

  `read(i)` returns a whole episode; `header(i)` only its header record and `span(i, ...)` only the
  chunks a window needs, which is what the training pipeline reads. Shards open lazily, so a
  reader is cheap to pickle into Grain worker processes. A truncated shard or a corrupted chunk
  fails when its record is read, with a DataError naming the shard file and record.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = paths.path(directory)  # pathlib, or epath for a gs:// URL
    path = self.directory / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(
        f"{path}: no episode manifest here; build a dataset with `python -m data_pipelines.build`"
      )
    try:
      manifest = json.loads(path.read_text())
      if not isinstance(manifest, dict):
        raise ValueError("it is not a JSON object")
      if manifest.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema {manifest.get('schema')!r}, this reader reads {SCHEMA_VERSION}")
      self.episodes = [EpisodeInfo(**e) for e in manifest["episodes"]]
      shards = manifest.get("shards", [])
      if not isinstance(shards, list):
        raise ValueError("field 'shards' is not a list")
    except (ValueError, KeyError, TypeError) as e:
      raise DataError("schema", str(path), f"malformed manifest: {e}") from None
    checked: set = set()
    for k, info in enumerate(self.episodes):
      for name, value, low in (
        ("index", info.index, 0),
        ("records", info.records, 1),
        ("num_micro_turns", info.num_micro_turns, 0),
      ):
        if not (isinstance(value, int) and value >= low):
          raise DataError(
            "schema", str(path), f"malformed manifest: episode {k} has {name} {value!r}; want an integer >= {low}"
          )
    for where, shard in [
      *((f"episode {k}", e.shard) for k, e in enumerate(self.episodes)),
      *(("'shards'", s) for s in shards),
    ]:
      if not isinstance(shard, str) or shard not in checked:
        _check_shard_name(self.directory, shard, str(path), where)
        checked.add(shard)
    self._readers: dict[str, ArrayRecordReader] = {}

  def __len__(self) -> int:
    return len(self.episodes)

  def fingerprint(self) -> str:
    """A hash of the manifest: part of the data-spec hash that a checkpoint records."""
    return hashlib.sha256((self.directory / MANIFEST).read_bytes()).hexdigest()[:16]

  def _bounds(self, i: int) -> None:
    """The episode's records must lie inside its shard: a shard holding fewer records than its
    manifest says (truncated, or a manifest that lies) fails here, before its numbers size anything."""
    info = self.episodes[i]
    held = self._reader(info.shard).num_records()
    if info.index + info.records > held:
      raise DataError(
        "corrupt",
        self._where(i, 0),
        f"cannot read records [{info.index}, {info.index + info.records}): the shard holds {held} records "
        "(truncated, or the manifest is wrong)",
      )

  def _reader(self, shard: str) -> ArrayRecordReader:
    if shard not in self._readers:
      path = self.directory / shard
      try:
        self._readers[shard] = ArrayRecordReader(str(path))
      except Exception as e:  # the extension raises plain RuntimeError/ValueError with its status text
        raise DataError(
          "corrupt", str(path), f"cannot open shard (truncated or not an ArrayRecord file): {e}"
        ) from None
    return self._readers[shard]

  def _where(self, i: int, record: int) -> str:
    info = self.episodes[i]
    return f"{self.directory / info.shard} record {info.index + record} (episode {info.id!r})"

  def _records(self, i: int, which: list[int]) -> list[bytes]:
    info = self.episodes[i]
    reader = self._reader(info.shard)
    try:
      return reader.read([info.index + r for r in which])
    except Exception as e:
      raise DataError("corrupt", self._where(i, which[0]), f"cannot read record (corrupted chunk): {e}") from None

  def header(self, i: int) -> EpisodeHeader:
    """The episode's header record, checked against itself, the manifest and the shard: text,
    events, frame times and the layout of its media."""
    self._bounds(i)
    info = self.episodes[i]
    head = _parse_header(self._records(i, [0])[0], self._where(i, 0))
    if head.media.chunks + 1 != info.records:
      raise DataError(
        "schema", self._where(i, 0), f"has {head.media.chunks} chunks; the manifest says {info.records - 1}"
      )
    if head.num_micro_turns != info.num_micro_turns:
      raise DataError(
        "schema",
        self._where(i, 0),
        f"has {head.num_micro_turns} micro-turns ('duration' {head.duration} s); "
        f"the manifest says {info.num_micro_turns}",
      )
    return head

  def span(self, i: int, head: EpisodeHeader, start_window: int, end_window: int) -> Span:
    """The media of the chunks that cover windows [start_window, end_window) (clipped to the episode)."""
    m = head.media
    if m.chunks == 0:
      return Span(None, None, 0, None, 0)
    first = min(max(start_window, 0) // m.chunk_windows, m.chunks - 1)
    last = min(max(end_window - 1, 0) // m.chunk_windows, m.chunks - 1)
    chunks = list(range(first, last + 1))
    data = self._records(i, [1 + k for k in chunks])
    parts = [_check_chunk(d, self._where(i, 1 + k), head, k) for d, k in zip(data, chunks)]
    audio = {}
    if m.audio_dtype is not None:
      for name in ("user_audio", "model_audio"):
        audio[name] = parts[0][name] if len(parts) == 1 else np.concatenate([p[name] for p in parts])
    frames, frame_offset = None, 0
    if m.frame_shape is not None:
      frames = parts[0]["frames"] if len(parts) == 1 else np.concatenate([p["frames"] for p in parts])
      frame_offset = int(sum(m.chunk_of_frame(float(t)) < first for t in head.frame_times))
    return Span(
      audio.get("user_audio"),
      audio.get("model_audio"),
      first * m.chunk_windows * SAMPLES_PER_MICRO_TURN,
      frames,
      frame_offset,
    )

  def read(self, i: int) -> Episode:
    """The whole episode, validated."""
    head = self.header(i)
    span = self.span(i, head, 0, head.media.chunks * head.media.chunk_windows)
    ep = dataclasses.replace(head.episode, user_audio=span.user_audio, model_audio=span.model_audio, frames=span.frames)
    validate(ep, self._where(i, 0))
    return ep

  def __getstate__(self):
    return {"directory": self.directory, "episodes": self.episodes}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = {}
