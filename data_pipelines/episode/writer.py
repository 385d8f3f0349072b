"""Writes episodes as a dataset directory: ArrayRecord shards of their records, and the manifest."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Iterable

from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines.episode.content import Episode, validate
from data_pipelines.episode.errors import DataError
from data_pipelines.episode.manifest import MANIFEST, EpisodeInfo, shard_name, write_manifest
from data_pipelines.episode.records import DEFAULT_CHUNK_SECONDS, episode_records
from tmlx import paths

WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per ArrayRecord chunk: random access reads one record


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
    name = shard_name(s, n)
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
  write_manifest(out, [shard_name(s, n) for s in range(n)], entries)
  return entries
