"""The manifest of an episode dataset: `manifest.json`, one `EpisodeInfo` per episode.

A dataset directory holds `episodes-XXXXX-of-YYYYY.array_record` shards and `manifest.json`, which
lists every episode's shard, first record, record count, id, micro-turn count and whether it has
audio and video, so that a pipeline can plan crops without reading any media. `read_manifest`
checks what the manifest alone can say: its numbers are integers in range and its shard names stay
inside the dataset directory; that the records are there is the reader's check.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from data_pipelines.episode.errors import DataError
from data_pipelines.episode.records import SCHEMA_VERSION
from tmlx import paths

MANIFEST = "manifest.json"


def shard_name(shard: int, shards: int) -> str:
  return f"episodes-{shard:05d}-of-{shards:05d}.array_record"


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


def write_manifest(directory: pathlib.Path, shards: list[str], entries: list[EpisodeInfo]) -> None:
  manifest = {"schema": SCHEMA_VERSION, "shards": shards, "episodes": [dataclasses.asdict(e) for e in entries]}
  (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def load_manifest(directory) -> dict:
  """`directory`'s manifest (`directory` a pathlib or epath path) as JSON: an object of this schema
  whose 'shards' is a list; raises FileNotFoundError without one, DataError "schema" otherwise."""
  path = directory / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no episode manifest here; build a dataset with `python -m data_pipelines.build`")
  try:
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict):
      raise ValueError("it is not a JSON object")
    if manifest.get("schema") != SCHEMA_VERSION:
      raise ValueError(f"schema {manifest.get('schema')!r}, this reader reads {SCHEMA_VERSION}")
    if not isinstance(manifest.get("shards", []), list):
      raise ValueError("field 'shards' is not a list")
  except ValueError as e:
    raise DataError("schema", str(path), f"malformed manifest: {e}") from None
  return manifest


def read_manifest(directory) -> list[EpisodeInfo]:
  """The entries of `directory`'s manifest (`directory` a pathlib or epath path), checked; raises
  FileNotFoundError without one, DataError "schema" for a malformed one."""
  path = directory / MANIFEST
  manifest = load_manifest(directory)
  shards = manifest.get("shards", [])
  try:
    episodes = [EpisodeInfo(**e) for e in manifest["episodes"]]
  except (KeyError, TypeError) as e:
    raise DataError("schema", str(path), f"malformed manifest: {e}") from None
  for k, info in enumerate(episodes):
    for name, value, low in (
      ("index", info.index, 0),
      ("records", info.records, 1),
      ("num_micro_turns", info.num_micro_turns, 0),
    ):
      if not (isinstance(value, int) and value >= low):
        raise DataError(
          "schema", str(path), f"malformed manifest: episode {k} has {name} {value!r}; want an integer >= {low}"
        )
  checked: set = set()
  for where, shard in [
    *((f"episode {k}", e.shard) for k, e in enumerate(episodes)),
    *(("'shards'", s) for s in shards),
  ]:
    if not isinstance(shard, str) or shard not in checked:
      _check_shard_name(directory, shard, str(path), where)
      checked.add(shard)
  return episodes


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
