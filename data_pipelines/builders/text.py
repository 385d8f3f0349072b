"""Text-only episodes from documents: `.txt` files and `.jsonl` chats.

A `.txt` file is the model's text (blank lines separate paragraphs); a `.jsonl` file holds one
document per line: {"turns": [{"speaker": "user" | "model", "text": str}, ...]}. A text-only
episode has no audio. The first micro-turn is left empty; the model's words then follow one another
at `words_per_second`; a user turn becomes a `typed_text` event at the time it occurs, and the
model's next words start in the following micro-turn. A paragraph ends with "\\n\\n" on its last
word and one silent micro-turn. The episode ends 0.2 s after its last word or event.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable

from data_pipelines.builders.inputs import expand_inputs
from data_pipelines.builders.policy import Policy, collect
from data_pipelines.contract import MICRO_TURN_SECONDS
from data_pipelines.episode import DataError, Episode, Event, Word, validate

TEXT_SUFFIXES = (".txt", ".jsonl")


class _TextClock:
  """Places a text-only conversation on a timeline (rules in the module docstring)."""

  def __init__(self, words_per_second: float):
    self.step = 1.0 / words_per_second
    self.t = MICRO_TURN_SECONDS
    self.words: list[Word] = []
    self.typed: list[Event] = []

  def _next_window(self) -> None:
    self.t = (math.floor(self.t / MICRO_TURN_SECONDS + 1e-9) + 1) * MICRO_TURN_SECONDS

  def model(self, text: str) -> None:
    for i, paragraph in enumerate(_paragraphs(text)):
      if i:
        self.words[-1] = Word(self.words[-1].start, self.words[-1].end, self.words[-1].text + "\n\n")
        self._next_window()
      for word in paragraph:
        self.words.append(Word(self.t, self.t + self.step, word))
        self.t += self.step

  def user(self, text: str) -> None:
    self.typed.append(Event(self.t, text.strip()))
    self._next_window()

  def episode(self, ep_id: str, meta: dict) -> Episode:
    end = max([w.end for w in self.words] + [e.time for e in self.typed])
    return Episode(
      id=ep_id, duration=end + MICRO_TURN_SECONDS, model_words=self.words, typed_text=self.typed, meta=meta
    )


def _paragraphs(text: str) -> list[list[str]]:
  return [p.split() for p in re.split(r"\n\s*\n", text) if p.split()]


def _text_documents(path: pathlib.Path) -> Iterable[tuple[str, str, list[tuple[str, str]] | DataError]]:
  """Yields (id, source, turns) per document, or a DataError in place of the turns of a bad one."""
  where = str(path)
  try:
    content = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    yield path.stem, path.name, DataError("transcript", where, f"cannot read: {e}")
    return
  if path.suffix.lower() == ".txt":
    yield path.stem, path.name, [("model", content)]
    return
  for lineno, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    yield f"{path.stem}-{lineno}", f"{path.name}:{lineno}", _jsonl_turns(line, where, lineno)


def _jsonl_turns(line: str, where: str, lineno: int) -> list[tuple[str, str]] | DataError:
  try:
    doc = json.loads(line)
  except json.JSONDecodeError as e:
    return DataError("transcript", where, f"line {lineno}: invalid JSON: {e.msg}")
  turns = doc.get("turns") if isinstance(doc, dict) else None
  if not isinstance(turns, list):
    return DataError("transcript", where, f'line {lineno}: want an object with a "turns" list')
  out = []
  for i, turn in enumerate(turns):
    ok = isinstance(turn, dict) and turn.get("speaker") in ("user", "model") and isinstance(turn.get("text"), str)
    if not ok:
      return DataError(
        "transcript", where, f'line {lineno}: turns[{i}] is {turn!r}; want {{"speaker": "user"|"model", "text": str}}'
      )
    out.append((turn["speaker"], turn["text"]))
  return out


def _text_episode(ep_id: str, source: str, turns, where: str, words_per_second: float) -> Episode:
  if isinstance(turns, DataError):
    raise turns
  clock = _TextClock(words_per_second)
  for speaker, text in turns:
    if not text.strip():
      continue
    (clock.model if speaker == "model" else clock.user)(text)
  if not clock.words and not clock.typed:
    raise DataError("empty", where, f"document {source} has no text")
  ep = clock.episode(ep_id, {"builder": "text", "source": source, "words_per_second": str(words_per_second)})
  validate(ep, f"{where} (document {source})")
  return ep


def build_text_episodes(
  inputs: Iterable[str | os.PathLike], *, words_per_second: float = 10.0, on_error: str = "skip"
) -> tuple[list[Episode], collections.Counter]:
  """Text-only episodes from .txt and .jsonl documents; returns (episodes, skips)."""
  if not words_per_second > 0:
    raise ValueError(f"words_per_second is {words_per_second}; it must be positive")
  policy = Policy(on_error)
  items = [
    (ep_id, str(path), ep_id, source, turns, str(path))
    for path in expand_inputs(inputs, TEXT_SUFFIXES)
    for ep_id, source, turns in _text_documents(path)
  ]
  make = lambda warn, *document: _text_episode(*document, words_per_second)
  return collect(items, make, policy), policy.skips
