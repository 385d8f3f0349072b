"""The records an episode is stored as: `episode_records` writes them, `parse_header` and
`check_chunk` read them back.

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

A parser trusts no number it has not checked against what the record holds, so that what a reader
allocates is bounded by the records themselves: C is what the writer lays out, ceil(N / S) (at
least 1) chunks for N samples, else ceil(windows / chunk_windows) (at least 1) with video, else 0;
1 <= chunk_windows <= MAX_CHUNK_WINDOWS; N is 0 without an audio dtype and within a sample of
duration x 16000 with one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLES_PER_MICRO_TURN
from data_pipelines.episode.content import AUDIO_DTYPES, Episode, Event, Word, check_audio_values, check_timing
from data_pipelines.episode.errors import DataError

SCHEMA_VERSION = 1
MAGIC = b"TMLXEPI1"
DEFAULT_CHUNK_SECONDS = 5.0
MAX_CHUNK_WINDOWS = 300  # 60 s: a reader reads whole chunks, so a chunk bounds what one read loads


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
  if media.audio_dtype is not None and media.audio_dtype not in AUDIO_DTYPES:
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
    return  # check_timing names it
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


def parse_header(data: bytes, where: str) -> EpisodeHeader:
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
  check_timing(
    ep,
    where,
    num_samples=media.num_samples if media.audio_dtype is not None else None,
    num_frames=None if media.frame_shape is None else (0 if ep.frame_times is None else len(ep.frame_times)),
  )
  return EpisodeHeader(ep, media)


def check_chunk(data: bytes, where: str, head: EpisodeHeader, k: int) -> dict[str, np.ndarray]:
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
      check_audio_values(audio, where, name)
  if m.frame_shape is not None:
    want = int(sum(m.chunk_of_frame(float(t)) == k for t in head.frame_times))
    frames = arrays.get("frames")
    if frames is None or frames.dtype != np.uint8 or frames.shape != (want, *m.frame_shape):
      got = "absent" if frames is None else f"{frames.dtype}{list(frames.shape)}"
      raise DataError("length", where, f"field 'frames' of chunk {k} is {got}; want uint8{[want, *m.frame_shape]}")
  return arrays
