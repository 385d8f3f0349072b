"""Text-only episodes from documents: `.txt` files and `.jsonl` chats.

A `.txt` file is the model's text (blank lines separate paragraphs); a `.jsonl` file holds one
document per line: {"turns": [{"speaker": "user" | "model", "text": str}, ...]}. A text-only
episode has no audio. The first micro-turn is left empty; the model's words then follow one another
at `words_per_second`; a user turn becomes a `typed_text` event at the time it occurs, and the
model's next words start in the following micro-turn. A paragraph ends with "\\n\\n" on its last
word and one silent micro-turn. The episode ends 0.2 s after its last word or event.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable

from data_pipelines.builders.inputs import Item, expand_inputs
from data_pipelines.contract import MICRO_TURN_SECONDS
from data_pipelines.episode import DataError, Episode, Event, Word, validate
from tmlx import paths

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


def text_items(inputs: Iterable[str | os.PathLike]) -> list[Item]:
  """One item per .txt file and per non-blank line of a .jsonl file (its byte range; the text is
  read when the item is built), in input order. JSON Lines end at "\\n" only (a "\\r" before it is
  dropped; U+2028 and its kind are text). An unreadable or non-UTF-8 .jsonl file is one item that
  fails; a .txt file is read only when it is built."""
  items = []
  for path in expand_inputs(inputs, TEXT_SUFFIXES):
    where = str(path)
    if path.suffix.lower() == ".txt":  # read when it is built
      items.append(Item(id=path.stem, where=where, files=(where,)))
      continue
    lines: list[Item] = []
    try:
      with paths.open(where, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):  # binary lines end at b"\n" only; one read at a time
          if line.decode("utf-8").strip():
            lines.append(
              Item(id=f"{path.stem}-{lineno}", where=where, files=(where,), part=(lineno, offset, len(line)))
            )
          offset += len(line)
    except (OSError, UnicodeDecodeError) as e:
      lines = [Item(id=path.stem, where=where, files=(where,), error=f"cannot read: {e}")]
    items += lines
  return items


def _document(item: Item) -> tuple[str, list[tuple[str, str]]]:
  """(source, turns) of a text item; DataError "transcript" for an unreadable or malformed one."""
  if item.error:
    raise DataError("transcript", item.where, item.error)
  name = os.path.basename(item.where)
  try:
    with paths.open(item.files[0], "rb") as f:
      if not item.part:
        return name, [("model", f.read().decode("utf-8"))]
      lineno, offset, size = item.part
      f.seek(offset)
      line = f.read(size).decode("utf-8-sig" if offset == 0 else "utf-8")  # a byte-order mark may open the file
  except (OSError, UnicodeDecodeError) as e:
    raise DataError("transcript", item.where, f"cannot read: {e}") from None
  return f"{name}:{lineno}", _jsonl_turns(line, item.where, lineno)


def _jsonl_turns(line: str, where: str, lineno: int) -> list[tuple[str, str]]:
  try:
    doc = json.loads(line)
  except json.JSONDecodeError as e:
    why = " (the lines of a .jsonl file end at \\n; this one holds a \\r)" if "\r" in line.rstrip("\r\n") else ""
    raise DataError("transcript", where, f"line {lineno}: invalid JSON: {e.msg}{why}") from None
  turns = doc.get("turns") if isinstance(doc, dict) else None
  if not isinstance(turns, list):
    raise DataError("transcript", where, f'line {lineno}: want an object with a "turns" list')
  out = []
  for i, turn in enumerate(turns):
    ok = isinstance(turn, dict) and turn.get("speaker") in ("user", "model") and isinstance(turn.get("text"), str)
    if not ok:
      raise DataError(
        "transcript", where, f'line {lineno}: turns[{i}] is {turn!r}; want {{"speaker": "user"|"model", "text": str}}'
      )
    out.append((turn["speaker"], turn["text"]))
  return out


def check_text_options(words_per_second: float) -> None:
  if not words_per_second > 0:
    raise ValueError(f"words_per_second is {words_per_second}; it must be positive")


def text_episode(item: Item, warn, words_per_second: float) -> Episode:
  """The episode of one text item (`text_items`), validated; DataError when it cannot be built."""
  source, turns = _document(item)
  clock = _TextClock(words_per_second)
  for speaker, text in turns:
    if not text.strip():
      continue
    (clock.model if speaker == "model" else clock.user)(text)
  if not clock.words and not clock.typed:
    raise DataError("empty", item.where, f"document {source} has no text")
  ep = clock.episode(item.id, {"builder": "text", "source": source, "words_per_second": str(words_per_second)})
  validate(ep, f"{item.where} (document {source})")
  return ep
