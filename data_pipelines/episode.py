"""Episodes: one recorded conversation, stored as one ArrayRecord record (no pickle).

An episode holds both speakers' audio (16 kHz), optional video frames with their times, word-timed
text per speaker, optional typed user text and optional background-model calls and results, each
with times in seconds from the start of the episode. A text-only episode has no audio and no video;
its duration comes from its text times.

Record layout, schema version 1 (all integers little-endian):

    bytes 0..7    magic b"TMLXEPI1"
    bytes 8..11   uint32 H, the header length
    H bytes       UTF-8 JSON header (below)
    the rest      the payload: each array's raw C-order bytes, at the offset its header entry gives

    header = {
      "schema": 1,
      "id": str,                    # unique within a dataset, e.g. the source file stem
      "sample_rate": 16000,
      "duration": float,            # seconds
      "arrays": {name: {"dtype": numpy dtype str, "shape": [..], "offset": int}},
          # user_audio, model_audio: [N] "<i2" (or "<f4" in [-1, 1]); absent for text-only episodes
          # frames: [T, H, W, 3] "|u1" RGB; frame_times: [T] "<f8" seconds, increasing
      "user_words" / "model_words": [[start, end, text], ...]   # start <= end, starts non-decreasing
      "typed_text" / "bg_calls" / "bg_results": [[time, text], ...]   # times non-decreasing
      "meta": {str: str},           # provenance (source files, builder), free-form
    }

A dataset directory holds `episodes-XXXXX-of-YYYYY.array_record` shards and `manifest.json`, which
lists every episode's shard, record index, id, micro-turn count and whether it has audio and video,
so that a pipeline can plan crops without reading the payload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
from collections.abc import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

SCHEMA_VERSION = 1
SAMPLE_RATE = 16_000
MICRO_TURN_SECONDS = 0.2
SAMPLES_PER_MICRO_TURN = 3200
MAGIC = b"TMLXEPI1"
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per chunk: random access reads one episode

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
  def num_windows(self) -> int:
    """Whole 200 ms windows in the episode."""
    return int(math.floor(self.duration / MICRO_TURN_SECONDS + 1e-9))

  @property
  def num_micro_turns(self) -> int:
    """Trainable micro-turns: I_t reads window t and O_t window t+1, so the last window has no I."""
    return max(self.num_windows - 1, 0)


def _arrays(ep: Episode) -> dict[str, np.ndarray]:
  named = {
    "user_audio": ep.user_audio,
    "model_audio": ep.model_audio,
    "frames": ep.frames,
    "frame_times": ep.frame_times,
  }
  return {k: np.ascontiguousarray(v) for k, v in named.items() if v is not None}


def to_bytes(ep: Episode) -> bytes:
  """Serializes an episode in the documented record layout."""
  arrays, payload, offset = {}, [], 0
  for name, arr in _arrays(ep).items():
    if name == "frame_times":
      arr = arr.astype("<f8")
    arrays[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
    data = arr.tobytes()
    pad = -len(data) % 8
    payload.append(data + b"\0" * pad)
    offset += len(data) + pad
  header = {
    "schema": SCHEMA_VERSION,
    "id": ep.id,
    "sample_rate": ep.sample_rate,
    "duration": float(ep.duration),
    "arrays": arrays,
    "user_words": [[w.start, w.end, w.text] for w in ep.user_words],
    "model_words": [[w.start, w.end, w.text] for w in ep.model_words],
    "typed_text": [[e.time, e.text] for e in ep.typed_text],
    "bg_calls": [[e.time, e.text] for e in ep.bg_calls],
    "bg_results": [[e.time, e.text] for e in ep.bg_results],
    "meta": {str(k): str(v) for k, v in ep.meta.items()},
  }
  head = json.dumps(header, separators=(",", ":")).encode()
  return MAGIC + struct.pack("<I", len(head)) + head + b"".join(payload)


def from_bytes(data: bytes, where: str) -> Episode:
  """Parses and validates one record; raises DataError naming `where` and the field."""
  if len(data) < 12 or data[:8] != MAGIC:
    raise DataError("schema", where, f"not a tmlx episode record (magic {data[:8]!r}, want {MAGIC!r})")
  (h,) = struct.unpack("<I", data[8:12])
  try:
    header = json.loads(data[12 : 12 + h])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError("schema", where, f"header is not valid JSON: {e}") from None
  if header.get("schema") != SCHEMA_VERSION:
    raise DataError("schema", where, f"field 'schema' is {header.get('schema')!r}; this reader reads {SCHEMA_VERSION}")
  body = memoryview(data)[12 + h :]
  arrays = {}
  for name, info in header.get("arrays", {}).items():
    try:
      dtype = np.dtype(info["dtype"])
      shape = tuple(int(n) for n in info["shape"])
      count = math.prod(shape)
      start = int(info["offset"])
      if start < 0 or start + count * dtype.itemsize > len(body):
        raise ValueError(f"needs bytes [{start}, {start + count * dtype.itemsize}) of a {len(body)}-byte payload")
      arrays[name] = np.frombuffer(body, dtype, count, start).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
      raise DataError("schema", where, f"array {name!r}: {e}") from None
  try:
    ep = Episode(
      id=str(header["id"]),
      duration=float(header["duration"]),
      sample_rate=int(header["sample_rate"]),
      user_audio=arrays.get("user_audio"),
      model_audio=arrays.get("model_audio"),
      frames=arrays.get("frames"),
      frame_times=arrays.get("frame_times"),
      user_words=[Word(float(s), float(e), str(t)) for s, e, t in header.get("user_words", [])],
      model_words=[Word(float(s), float(e), str(t)) for s, e, t in header.get("model_words", [])],
      typed_text=[Event(float(t), str(x)) for t, x in header.get("typed_text", [])],
      bg_calls=[Event(float(t), str(x)) for t, x in header.get("bg_calls", [])],
      bg_results=[Event(float(t), str(x)) for t, x in header.get("bg_results", [])],
      meta=dict(header.get("meta", {})),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise DataError("schema", where, f"malformed header field: {e!r}") from None
  validate(ep, where)
  return ep


def validate(ep: Episode, where: str) -> None:
  """Checks sample rate, lengths, finite audio and timestamps; raises DataError naming the field."""
  if ep.sample_rate != SAMPLE_RATE:
    raise DataError("sample_rate", where, f"field 'sample_rate' is {ep.sample_rate}; episodes are {SAMPLE_RATE} Hz")
  if not (math.isfinite(ep.duration) and ep.duration > 0):
    raise DataError("length", where, f"field 'duration' is {ep.duration}; it must be a positive number of seconds")
  if (ep.user_audio is None) != (ep.model_audio is None):
    raise DataError("length", where, "fields 'user_audio' and 'model_audio' must both be present or both absent")
  if ep.user_audio is not None:
    want = round(ep.duration * SAMPLE_RATE)
    for name in ("user_audio", "model_audio"):
      audio = getattr(ep, name)
      if audio.ndim != 1 or audio.dtype.str not in _AUDIO_DTYPES:
        raise DataError(
          "schema", where, f"field {name!r} is {audio.dtype}{list(audio.shape)}; want 1-D int16 or float32"
        )
      if abs(len(audio) - want) > 1:
        raise DataError(
          "length", where, f"field {name!r} has {len(audio)} samples; 'duration' {ep.duration} s means {want}"
        )
      if audio.dtype.kind == "f":
        bad = ~np.isfinite(audio)
        if bad.any():
          i = int(np.argmax(bad))
          raise DataError("non_finite", where, f"field {name!r} has {int(bad.sum())} NaN/Inf samples (first at {i})")
        if np.abs(audio).max(initial=0) > 1.0:
          raise DataError("audio_range", where, f"field {name!r} is float audio outside [-1, 1]")
  if ep.frames is not None or ep.frame_times is not None:
    if ep.frames is None or ep.frame_times is None:
      raise DataError("length", where, "fields 'frames' and 'frame_times' must both be present or both absent")
    if ep.frames.ndim != 4 or ep.frames.shape[-1] != 3 or ep.frames.dtype != np.uint8:
      raise DataError(
        "schema", where, f"field 'frames' is {ep.frames.dtype}{list(ep.frames.shape)}; want uint8 [T,H,W,3]"
      )
    if len(ep.frames) != len(ep.frame_times):
      raise DataError(
        "length", where, f"field 'frames' has {len(ep.frames)} frames but 'frame_times' has {len(ep.frame_times)}"
      )
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
  """One manifest entry."""

  shard: str
  index: int
  id: str
  num_micro_turns: int
  has_audio: bool
  has_video: bool


def write_dataset(episodes: Iterable[Episode], out_dir: str | os.PathLike, episodes_per_shard: int = 64) -> list:
  """Writes episodes into ArrayRecord shards plus `manifest.json`; returns the manifest entries.

  Each episode is validated first (DataError names the episode id). Shards are written under a
  temporary name and renamed when complete, and the manifest is written last.
  """
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
    for i, ep in enumerate(group):
      writer.write(to_bytes(ep))
      entries.append(EpisodeInfo(name, i, ep.id, ep.num_micro_turns, ep.has_audio, ep.has_video))
    writer.close()
    os.replace(tmp, out / name)
  manifest = {
    "schema": SCHEMA_VERSION,
    "shards": [f"episodes-{s:05d}-of-{n:05d}.array_record" for s in range(n)],
    "episodes": [dataclasses.asdict(e) for e in entries],
  }
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return entries


class EpisodeReader:
  """Random access to a dataset directory's episodes by manifest position.

  Shards open lazily, so a reader is cheap to pickle into Grain worker processes. A truncated
  shard fails when it is opened; a corrupted chunk fails when its record is read. Both raise
  DataError naming the shard file and record.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    path = self.directory / MANIFEST
    if not path.is_file():
      raise FileNotFoundError(
        f"{path}: no episode manifest here; build a dataset with `python -m data_pipelines.build`"
      )
    try:
      manifest = json.loads(path.read_text())
      if manifest.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema {manifest.get('schema')!r}, this reader reads {SCHEMA_VERSION}")
      self.episodes = [EpisodeInfo(**e) for e in manifest["episodes"]]
    except (ValueError, KeyError, TypeError) as e:
      raise DataError("schema", str(path), f"malformed manifest: {e}") from None
    self._readers: dict[str, ArrayRecordReader] = {}

  def __len__(self) -> int:
    return len(self.episodes)

  def fingerprint(self) -> str:
    """A hash of the manifest: part of the data-spec hash that a checkpoint records."""
    return hashlib.sha256((self.directory / MANIFEST).read_bytes()).hexdigest()[:16]

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

  def read(self, i: int) -> Episode:
    info = self.episodes[i]
    where = f"{self.directory / info.shard} record {info.index} (episode {info.id!r})"
    reader = self._reader(info.shard)
    try:
      (data,) = reader.read([info.index])
    except Exception as e:
      raise DataError("corrupt", where, f"cannot read record (corrupted chunk): {e}") from None
    return from_bytes(data, where)

  def __getstate__(self):
    return {"directory": self.directory, "episodes": self.episodes}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = {}
