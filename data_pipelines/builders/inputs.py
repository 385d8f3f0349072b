"""The inputs of a build: the files that INPUT arguments name, and the transcript beside each media file."""

from __future__ import annotations

import glob
import os
import pathlib
from collections.abc import Iterable, Sequence

from data_pipelines import transcripts
from data_pipelines.episode import DataError


def expand_inputs(inputs: Iterable[str | os.PathLike], suffixes: Sequence[str]) -> list[pathlib.Path]:
  """Files named by `inputs` (files, directories searched recursively, glob patterns), sorted and unique."""
  found: list[pathlib.Path] = []
  wanted = tuple(s.lower() for s in suffixes)
  for item in inputs:
    text = str(item)
    path = pathlib.Path(text)
    if path.is_dir():
      found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.name.lower().endswith(wanted))
    elif path.is_file():
      found.append(path)
    elif glob.has_magic(text):
      matches = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True))
      found.extend(p for p in matches if p.is_file() and p.name.lower().endswith(wanted))
    else:
      raise FileNotFoundError(f"{text}: no such file, directory or glob match")
  return list(dict.fromkeys(found))  # unique, in order


def find_transcript(stem: pathlib.Path) -> pathlib.Path:
  """The single transcript `<stem>.json`, `<stem>.TextGrid` (any case) or `<stem>.ctm` beside a media file."""
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
