"""Word-timed transcripts of a two-speaker conversation, read into episode `Word` and `Event` lists.

`load_transcript(path, **options)` picks the parser by the file's extension. Times are seconds from
the start of the recording. Parsers check structure only (missing fields, wrong types, unreadable
lines) and raise DataError with reason "transcript" naming the file and the entry or line; whether
times are ordered and inside the recording is checked when the episode is validated (reason
"timestamps").

JSON (`.json`): one object; every key is optional, but "user" or "model" must be present.

    {
      "user":       [{"word": str, "start": float, "end": float}, ...],   # channel A, the input
      "model":      [{"word": str, "start": float, "end": float}, ...],   # channel B, the output
      "typed_text": [{"time": float, "text": str}, ...],   # text the user typed
      "bg_calls":   [{"time": float, "text": str}, ...],   # requests the model sent to a background model
      "bg_results": [{"time": float, "text": str}, ...]    # answers that came back
    }

Praat TextGrid (`.TextGrid`, `.textgrid`): one interval tier per speaker, named `user_tier` and
`model_tier` ("user" and "model" by default); each non-empty interval label is one word (surrounding
whitespace stripped). Point tiers named "typed_text", "bg_calls" and "bg_results", when present,
give the events. At least one speaker tier must exist.

NIST CTM (`.ctm`): one word per line, `<utterance> <channel> <start> <duration> <word> [<confidence>]`,
separated by whitespace; blank lines and lines starting with `;;` are ignored. `channels` maps the
channel field to "user" or "model" (by default "A" and "1" are the user, "B" and "2" the model).
CTM has no events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from praatio import textgrid
from praatio.utilities import constants

from data_pipelines.episode import DataError, Event, Word

SPEAKERS = ("user", "model")
EVENT_FIELDS = ("typed_text", "bg_calls", "bg_results")
DEFAULT_CHANNELS = {"A": "user", "1": "user", "B": "model", "2": "model"}
SUFFIXES = (".json", ".TextGrid", ".textgrid", ".ctm")


@dataclasses.dataclass
class Transcript:
  """Both speakers' words and the conversation's text events, in file order."""

  user_words: list[Word] = dataclasses.field(default_factory=list)
  model_words: list[Word] = dataclasses.field(default_factory=list)
  typed_text: list[Event] = dataclasses.field(default_factory=list)
  bg_calls: list[Event] = dataclasses.field(default_factory=list)
  bg_results: list[Event] = dataclasses.field(default_factory=list)


def load_transcript(
  path: str | os.PathLike,
  *,
  user_tier: str = "user",
  model_tier: str = "model",
  channels: dict[str, str] | None = None,
) -> Transcript:
  """Reads a JSON, TextGrid or CTM transcript, chosen by the file's extension."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix == ".json":
    return parse_json(path)
  if suffix == ".textgrid":
    return parse_textgrid(path, user_tier=user_tier, model_tier=model_tier)
  if suffix == ".ctm":
    return parse_ctm(path, channels=channels)
  raise DataError("transcript", str(path), f"unknown transcript type {path.suffix!r}; want one of {SUFFIXES}")


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError("transcript", str(path), f"cannot read: {e}") from None


def _number(value, where: str, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise DataError("transcript", where, f"{what} is {value!r}; want a number of seconds")
  return float(value)


def _text(value, where: str, what: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise DataError("transcript", where, f"{what} is {value!r}; want a non-empty string")
  return value.strip()


def parse_json(path: str | os.PathLike) -> Transcript:
  """Parses the JSON transcript format in the module docstring."""
  path = pathlib.Path(path)
  where = str(path)
  try:
    doc = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise DataError("transcript", where, f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
  if not isinstance(doc, dict):
    raise DataError("transcript", where, f"the top level is a {type(doc).__name__}; want an object")
  unknown = sorted(set(doc) - set(SPEAKERS) - set(EVENT_FIELDS))
  if unknown:
    raise DataError("transcript", where, f"unknown fields {unknown}; known: {list(SPEAKERS + EVENT_FIELDS)}")
  if not any(s in doc for s in SPEAKERS):
    raise DataError("transcript", where, "has neither a 'user' nor a 'model' word list")
  out = Transcript()
  for field in SPEAKERS + EVENT_FIELDS:
    entries = doc.get(field, [])
    if not isinstance(entries, list):
      raise DataError("transcript", where, f"field {field!r} is a {type(entries).__name__}; want a list")
    parsed = []
    for i, entry in enumerate(entries):
      what = f"{field}[{i}]"
      if not isinstance(entry, dict):
        raise DataError("transcript", where, f"entry {what} is {entry!r}; want an object")
      keys = ("word", "start", "end") if field in SPEAKERS else ("time", "text")
      missing = [k for k in keys if k not in entry]
      if missing:
        raise DataError("transcript", where, f"entry {what} lacks {missing}: {entry!r}")
      if field in SPEAKERS:
        word = _text(entry["word"], where, f"{what}.word")
        parsed.append(
          Word(_number(entry["start"], where, f"{what}.start"), _number(entry["end"], where, f"{what}.end"), word)
        )
      else:
        parsed.append(Event(_number(entry["time"], where, f"{what}.time"), _text(entry["text"], where, f"{what}.text")))
    setattr(out, _attribute(field), parsed)
  return out


def _attribute(field: str) -> str:
  return f"{field}_words" if field in SPEAKERS else field


def parse_textgrid(path: str | os.PathLike, *, user_tier: str = "user", model_tier: str = "model") -> Transcript:
  """Parses a Praat TextGrid (long or short text format, or praatio's JSON) with praatio."""
  path = pathlib.Path(path)
  where = str(path)
  try:
    grid = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
  except Exception as e:  # praatio raises assorted errors (ValueError, IndexError, its own) on bad files
    raise DataError("transcript", where, f"not a readable TextGrid: {type(e).__name__}: {e}") from None
  names = list(grid.tierNames)
  if user_tier not in names and model_tier not in names:
    raise DataError("transcript", where, f"has neither tier {user_tier!r} nor {model_tier!r}; tiers: {names}")
  out = Transcript()
  for field, name in zip(SPEAKERS, (user_tier, model_tier)):
    if name not in names:
      continue
    tier = grid.getTier(name)
    if tier.tierType != constants.INTERVAL_TIER:
      raise DataError("transcript", where, f"tier {name!r} is a {tier.tierType}; want an interval tier")
    words = [Word(float(e.start), float(e.end), e.label.strip()) for e in tier.entries if e.label.strip()]
    setattr(out, _attribute(field), words)
  for field in EVENT_FIELDS:
    if field not in names:
      continue
    tier = grid.getTier(field)
    if tier.tierType != constants.POINT_TIER:
      raise DataError("transcript", where, f"tier {field!r} is a {tier.tierType}; want a point tier")
    setattr(out, field, [Event(float(p.time), p.label.strip()) for p in tier.entries if p.label.strip()])
  return out


def parse_ctm(path: str | os.PathLike, *, channels: dict[str, str] | None = None) -> Transcript:
  """Parses a NIST CTM file; `channels` maps the channel field to "user" or "model"."""
  path = pathlib.Path(path)
  channels = DEFAULT_CHANNELS if channels is None else channels
  bad = {k: v for k, v in channels.items() if v not in SPEAKERS}
  if bad:
    raise ValueError(f"channel mapping {bad} names no speaker; want 'user' or 'model'")
  out = Transcript()
  for lineno, line in enumerate(_read_text(path).splitlines(), 1):
    where = str(path)
    fields = line.split()
    if not fields or fields[0].startswith(";;"):
      continue
    if len(fields) not in (5, 6):
      raise DataError(
        "transcript",
        where,
        f"line {lineno} has {len(fields)} fields; want <utt> <channel> <start> <dur> <word> [<conf>]",
      )
    _, channel, start, dur, word = fields[:5]
    if channel not in channels:
      raise DataError("transcript", where, f"line {lineno}: channel {channel!r} is not in the mapping {channels}")
    try:
      begin, length = float(start), float(dur)
      if len(fields) == 6:
        float(fields[5])
    except ValueError:
      raise DataError(
        "transcript", where, f"line {lineno}: start, duration or confidence is not a number: {line!r}"
      ) from None
    getattr(out, _attribute(channels[channel])).append(Word(begin, begin + length, word))
  if not out.user_words and not out.model_words:
    raise DataError("transcript", str(path), "has no words")
  return out
