"""What a build does with a bad input (`--on_error`: skip and count it by reason, or raise) and with
the warnings of the episodes it keeps, applied to each item in turn (`build_each`)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator

from data_pipelines.builders.inputs import Item
from data_pipelines.episode import DataError, Episode

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
WARNINGS = ("clipped", "resampled_below_8khz", "truncated_kept")  # kinds of warnings a written episode may carry

Warn = Callable[[str, str], None]  # warn(kind, message): notes a warning about the episode being built


class Policy:
  """Applies --on_error to DataErrors and counts skips by reason, and warnings of kept episodes by kind."""

  def __init__(self, on_error: str, warnings: collections.Counter | None = None):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error is {on_error!r}; want one of {ON_ERROR}")
    self.on_error = on_error
    self.skips: collections.Counter = collections.Counter()
    self.warnings = collections.Counter() if warnings is None else warnings

  def __call__(self, error: DataError) -> None:
    if self.on_error == "raise":
      raise error
    log.warning("skipped (%s) %s", error.reason, error)
    self.skips[error.reason] += 1

  def kept(self, notes: list[tuple[str, str]]) -> None:
    """Logs the warnings of an episode that was kept and counts each kind once."""
    for kind, message in notes:
      if kind not in WARNINGS:
        raise ValueError(f"warning kind {kind!r} is not one of {WARNINGS}")
      log.warning("warning (%s) %s", kind, message)
    for kind in dict.fromkeys(kind for kind, _ in notes):
      self.warnings[kind] += 1


def build_each(items: Iterable[Item], make: Callable[[Item, Warn], Episode], policy: Policy) -> Iterator[Episode]:
  """Runs `make(item, warn)` (which validates) on each item in turn, yielding each episode built.

  The first item with an id that builds wins it: a later item with that id is a "duplicate" skip
  (not built). Errors go to `policy`, and so do the warnings of each episode kept.
  """
  seen = set()
  for item in items:
    notes: list[tuple[str, str]] = []
    try:
      if not item.id.isprintable():  # what is not UTF-8 (a surrogate) is not printable either
        where = item.where.encode("utf-8", "backslashreplace").decode()
        raise DataError("schema", where, f"episode id {item.id!r} (the file name) is not printable UTF-8; rename it")
      if item.id in seen:
        raise DataError(
          "duplicate", item.where, f"episode id {item.id!r} (the file stem) is already taken by another input"
        )
      ep = make(item, lambda kind, message, notes=notes: notes.append((kind, message)))
    except DataError as e:
      policy(e)
      continue
    seen.add(item.id)
    policy.kept(notes)
    yield ep
