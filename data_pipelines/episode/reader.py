"""Random access to the episodes of a dataset directory (`EpisodeReader`), reading only what is asked.

A reader trusts no number it has not checked against what the records hold, so that what it
allocates is bounded by the records themselves: shard names stay inside the dataset directory
(`manifest.read_manifest`), an episode's records lie inside its shard, C + 1 of them, each checked
as it is parsed (`records`), and the manifest's micro-turn count is the header's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from data_pipelines.contract import SAMPLES_PER_MICRO_TURN
from data_pipelines.episode.content import Episode, validate
from data_pipelines.episode.errors import DataError
from data_pipelines.episode.manifest import MANIFEST, read_manifest
from data_pipelines.episode.records import EpisodeHeader, check_chunk, parse_header
from tmlx import paths


@dataclasses.dataclass(frozen=True)
class Span:
  """Media of whole chunks of an episode: samples from `sample_offset`, frames from `frame_offset`."""

  user_audio: np.ndarray | None
  model_audio: np.ndarray | None
  sample_offset: int
  frames: np.ndarray | None
  frame_offset: int


class EpisodeReader:
  """Random access to a dataset directory's episodes by manifest position.

  `read(i)` returns a whole episode; `header(i)` only its header record and `span(i, ...)` only the
  chunks a window needs, which is what the training pipeline reads. Shards open lazily, so a
  reader is cheap to pickle into Grain worker processes. A truncated shard or a corrupted chunk
  fails when its record is read, with a DataError naming the shard file and record.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = paths.path(directory)  # pathlib, or epath for a gs:// URL
    self.episodes = read_manifest(self.directory)
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
    head = parse_header(self._records(i, [0])[0], self._where(i, 0))
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
    parts = [check_chunk(d, self._where(i, 1 + k), head, k) for d, k in zip(data, chunks)]
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
