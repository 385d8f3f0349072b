"""Episodes: one recorded conversation, stored as a run of ArrayRecord records (no pickle).

    content    what an episode holds (`Episode`, `Word`, `Event`) and `validate`, what a valid one is
    errors     `DataError`, bad input data, and the reasons (`SKIP_REASONS`) skips are counted by
    records    the record format: a header record and media chunk records per episode (schema 1)
    manifest   a dataset directory's `manifest.json`: where each episode's records are (`EpisodeInfo`)
    writer     `write_dataset`: episodes into ArrayRecord shards and the manifest
    reader     `EpisodeReader`: random access to a dataset's episodes, checked against what they hold

The names below are the public ones; import them from here.
"""

from data_pipelines.episode.content import MAX_TEXT_GAP_SECONDS, Episode, Event, Word, validate
from data_pipelines.episode.errors import SKIP_REASONS, DataError
from data_pipelines.episode.manifest import MANIFEST, EpisodeInfo
from data_pipelines.episode.reader import EpisodeReader, Span
from data_pipelines.episode.records import (
  DEFAULT_CHUNK_SECONDS,
  MAX_CHUNK_WINDOWS,
  SCHEMA_VERSION,
  EpisodeHeader,
  Media,
  episode_records,
)
from data_pipelines.episode.records import _pack as _pack  # tests craft hostile records with these two
from data_pipelines.episode.records import _unpack as _unpack
from data_pipelines.episode.writer import WRITER_OPTIONS, write_dataset

__all__ = [
  "DEFAULT_CHUNK_SECONDS",
  "MANIFEST",
  "MAX_CHUNK_WINDOWS",
  "MAX_TEXT_GAP_SECONDS",
  "SCHEMA_VERSION",
  "SKIP_REASONS",
  "WRITER_OPTIONS",
  "DataError",
  "Episode",
  "EpisodeHeader",
  "EpisodeInfo",
  "EpisodeReader",
  "Event",
  "Media",
  "Span",
  "Word",
  "episode_records",
  "validate",
  "write_dataset",
]
