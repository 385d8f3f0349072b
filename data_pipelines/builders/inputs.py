"""The inputs of a build: the files that INPUT arguments name, the transcript beside each media file,
and `Item`, one episode's worth of input.

An INPUT may be a local path or an object-store URL (`gs://...`, through `tmlx.paths`). A build
lists its items first (cheap: names, and the lines of .jsonl documents) and then builds each one on
its own (`data_pipelines.builders.Builder`), so that items can be built in any process, in any
order. An item on object storage is copied to a local temporary directory, with the transcripts
beside it, only while it is built (`local_copy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from data_pipelines import transcripts
from data_pipelines.episode import DataError
from tmlx import paths


@dataclasses.dataclass(frozen=True)
class Item:
  """What one episode is built from. `files`: the media or document files ("" for the missing half
  of a pair); `stem`: the path without suffix that its transcript sits beside ("" for text);
  `part`: (line number, byte offset, byte length) of a .jsonl document, () for a whole file;
  `error`: why the item cannot be built, found while listing (raised as a "transcript" DataError)."""

  id: str
  where: str
  files: tuple[str, ...]
  stem: str = ""
  part: tuple[int, ...] = ()
  error: str = ""

  def versioned(self) -> list[str]:
    """The files whose versions its episode depends on: its own, and the transcripts that may sit
    beside its stem."""
    return [*self.files, *([self.stem + suffix for suffix in transcripts.SUFFIXES] if self.stem else [])]


def expand_inputs(inputs: Iterable[str | os.PathLike], suffixes: Sequence[str]) -> list:
  """Files named by `inputs` (files, directories searched recursively, glob patterns), unique, each
  directory's and pattern's in path order (by component, as pathlib sorts, locally and on object
  storage alike): `pathlib.Path`s, or `etils.epath.Path`s for URLs."""
  found: list[str] = []
  wanted = tuple(s.lower() for s in suffixes)
  for item in inputs:
    text = os.fspath(item)
    if paths.is_dir(text):
      found.extend(p for p in paths.files_under(text) if p.lower().endswith(wanted))
    elif paths.is_file(text):
      found.append(text)
    elif glob.has_magic(text):
      found.extend(p for p in paths.glob(text) if p.lower().endswith(wanted))
    else:
      raise FileNotFoundError(f"{text}: no such file, directory or glob match")
  return [paths.path(p) for p in dict.fromkeys(found)]  # unique, in order


@contextlib.contextmanager
def local_copy(item: Item) -> Iterator[Item]:
  """The item itself when its files are local; else the item with its files, and the transcripts
  beside its stem, copied into a temporary directory (removed afterwards). DataErrors raised inside
  name the URLs, not the copies."""
  if not any(paths.is_remote(f) for f in (*item.files, item.stem)):
    yield item
    return
  with tempfile.TemporaryDirectory(prefix="tmlx_build_") as tmp:
    copied = {}
    for url in [f for f in item.files if f]:
      copied[url] = os.path.join(tmp, url.rsplit("/", 1)[-1])
      paths.download(url, copied[url])
    stem = os.path.join(tmp, item.stem.rsplit("/", 1)[-1]) if item.stem else ""
    for suffix in transcripts.SUFFIXES if item.stem else ():
      if paths.is_file(item.stem + suffix):
        paths.download(item.stem + suffix, stem + suffix)
    try:
      yield dataclasses.replace(item, files=tuple(copied.get(f, f) for f in item.files), stem=stem)
    except DataError as e:
      folder = item.stem.rsplit("/", 1)[0] if item.stem else item.files[0].rsplit("/", 1)[0]
      raise DataError(e.reason, e.where.replace(tmp, folder), e.detail.replace(tmp, folder)) from None


def find_transcript(stem: pathlib.Path) -> pathlib.Path:
  """The single transcript `<stem>.json`, `<stem>.TextGrid` (or `.textgrid`) or `<stem>.ctm` beside a media file."""
  found: list[pathlib.Path] = []
  for suffix in transcripts.SUFFIXES:
    path = stem.parent / f"{stem.name}{suffix}"
    if path.is_file() and not any(path.samefile(f) for f in found):  # .TextGrid and .textgrid may be one file
      found.append(path)
  if not found:
    raise DataError("transcript", str(stem), f"no transcript beside it (want {stem.name}.json, .TextGrid or .ctm)")
  if len(found) > 1:
    raise DataError("transcript", str(stem), f"several transcripts beside it: {[p.name for p in found]}")
  return found[0]


def transcript_fields(stem: pathlib.Path, options: dict) -> tuple[dict, str]:
  """The `Episode` fields read from the transcript beside `stem`, and that transcript's file name."""
  path = find_transcript(stem)
  t = transcripts.load_transcript(path, **options)
  fields = {
    "user_words": t.user_words,
    "model_words": t.model_words,
    "typed_text": t.typed_text,
    "bg_calls": t.bg_calls,
    "bg_results": t.bg_results,
  }
  return fields, path.name


def transcript_options(user_tier: str, model_tier: str, ctm_channels: dict[str, str] | None) -> dict:
  """The `options` of `transcript_fields` (keyword arguments of `transcripts.load_transcript`)."""
  return {"user_tier": user_tier, "model_tier": model_tier, "channels": ctm_channels}
