"""Packed rows cropped from episode datasets, mixed by weight (the `episodes` data source).

Row (step, r) is a pure function of (seed, mixture, step, r): a random generator seeded with
those picks the row's dataset by weight, then fills the row with windows of consecutive
micro-turns, each from an episode picked in proportion to its micro-turn count, until the next
micro-turn does not fit (the rest is padding). A window's start is drawn uniformly from the
micro-turns a window of its size could start at, those before the episode included and clipped to
its first micro-turn, so that every micro-turn is about as likely to be trained on as any other: with
starts uniform over the episode, its first micro-turns (the opening of every conversation, which
every live session begins with) would be in a row a fraction of the time the rest is. Each
window is one segment, its micro-turns built and laid out by `data_pipelines.microturn` (the
writer the streaming session uses too). Audio features are computed for the window only (causal
dMel reads a short left context; see `data_pipelines.dmel`).

Bad episodes: with `on_error="raise"` the first DataError stops the pipeline, naming the file,
record and field. With `on_error="skip"` the draw is counted under its reason (`stats`) and the
generator draws again, so the row stays a pure function of its indices; the train loop logs the
counts and stops when the skipped fraction passes `data.max_skip_ratio`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pathlib
import threading

import numpy as np

from data_pipelines import microturn
from data_pipelines.align import AlignSpec, Layout, align
from data_pipelines.contract import AUDIO_POSITIONS_PER_MICRO_TURN, FRAMES_PER_MICRO_TURN, RowSpec
from data_pipelines.episode import SKIP_REASONS, DataError, EpisodeHeader, EpisodeReader, Span
from data_pipelines.tokenizer import Tokenizer
from tmlx import paths

_MAX_CONSECUTIVE_SKIPS = 1000
STAT_KEYS = ("windows", *(f"skipped_{r}" for r in SKIP_REASONS))


def empty_stats() -> dict[str, np.ndarray]:
  return {k: np.zeros((), np.int64) for k in STAT_KEYS}


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  path: str
  weight: float


def locate(path: str, root: str | os.PathLike | None) -> pathlib.Path:
  """Local dataset directory `path`: as it is if absolute or present in the working directory,
  else under `root` (the project root) if there."""
  p = pathlib.Path(path)
  if not p.is_absolute() and not p.exists() and root is not None and (pathlib.Path(root) / p).exists():
    return pathlib.Path(root) / p
  return p


def _parse_entries(spec: str, root: str | os.PathLike | None) -> list[MixtureEntry]:
  entries = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    path, sep, weight = part.rpartition(":")
    if not sep or "/" in weight:  # no weight: a bare DIR, or a bare URL ('gs' + '//BUCKET/PATH')
      path, weight = part, "1"
    try:
      w = float(weight)
    except ValueError:
      raise ValueError(f"config data.mixture: weight {weight!r} of {path!r} is not a number") from None
    if not w > 0:
      raise ValueError(f"config data.mixture: weight of {path!r} is {w}; weights must be positive")
    if paths.is_remote(path):
      entries.append(MixtureEntry(path.rstrip("/"), w))
      continue
    entries.append(MixtureEntry(str(locate(path, root)), w))
  return entries


# Weight stages of a mixture: (first step, one weight per dataset of the mixture, 0 where the stage
# does not name it), by first step.
Stages = tuple[tuple[int, tuple[float, ...]], ...]


def parse_stages(spec: str, root: str | os.PathLike | None = None) -> tuple[list[MixtureEntry], Stages]:
  """Parses config `data.mixture`: "DIR:WEIGHT,DIR:WEIGHT,..." (a bare DIR has weight 1), or
  weight stages by training step separated by ";", each after the first starting at "STEP=":
  "a:0.7,b:0.3;5000=a:0.2,b:0.8" trains on a and b 70/30 before step 5000 and 20/80 from it on.

  Returns every dataset the stages name (first-seen order; `weight` is the first stage's, 0 when
  it does not name the dataset) and the stages. A relative DIR is looked up in the working
  directory, then under `root` (the project root, where the sample corpus lives). A DIR may be an
  object-store URL (`gs://BUCKET/PATH:0.5`).
  """
  named: list[tuple[int, list[MixtureEntry]]] = []
  for k, text in enumerate(t.strip() for t in spec.split(";")):
    start = 0
    head, eq, rest = text.partition("=")
    where = f"config data.mixture: stage {k + 1} {text!r}"
    if eq:
      if not head.strip().isdigit():
        raise ValueError(f"{where}: expected STEP=DIR:WEIGHT,... with a step number")
      start, text = int(head), rest
    elif k:
      raise ValueError(f"{where} has no STEP= before its datasets")
    entries = _parse_entries(text, root)
    if not entries:
      raise ValueError(
        "config data.mixture is empty; give one or more DIR:WEIGHT entries"
        if len(spec.split(";")) == 1
        else f"config data.mixture: stage {k + 1} names no dataset"
      )
    if named and start <= named[-1][0]:
      raise ValueError(f"{where} starts at step {start}, not after stage {k}'s {named[-1][0]}")
    if not named and start:
      raise ValueError(f"config data.mixture: the first stage starts at step {start}; it must start at 0 (no STEP=)")
    named.append((start, entries))
  order = list(dict.fromkeys(e.path for _, entries in named for e in entries))
  stages = []
  for start, entries in named:
    weights = dict.fromkeys(order, 0.0)
    for e in entries:
      weights[e.path] += e.weight
    stages.append((start, tuple(weights.values())))
  first = stages[0][1]
  return [MixtureEntry(path, w) for path, w in zip(order, first)], tuple(stages)


def parse_mixture(spec: str, root: str | os.PathLike | None = None) -> list[MixtureEntry]:
  """Every dataset of config `data.mixture` with its weight in the first stage (`parse_stages`)."""
  return parse_stages(spec, root)[0]


@dataclasses.dataclass(frozen=True)
class EpisodeSourceSpec:
  row: RowSpec
  seed: int
  mixture: tuple[MixtureEntry, ...]
  align: AlignSpec
  causal: bool
  max_window: int  # micro-turns per window; 0: as many as fit
  on_error: str  # "raise" | "skip"
  cache_size: int  # decoded episodes kept per process (or worker)
  stages: Stages = ()  # weight stages by step (`parse_stages`); () or one stage: the entries' weights


@dataclasses.dataclass(frozen=True)
class Window:
  """`length` micro-turns of episode `episode` of dataset `dataset`, from micro-turn `start`, and
  the media chunks they need (None when planned without reading media)."""

  dataset: int
  episode: int
  start: int
  length: int
  media: Span | None = dataclasses.field(default=None, compare=False, repr=False)


class EpisodeSource:
  """Rows in the packed-batch contract from a weighted mixture of episode datasets."""

  def __init__(self, spec: EpisodeSourceSpec, tokenizer: Tokenizer):
    if spec.row.frames_per_position * AUDIO_POSITIONS_PER_MICRO_TURN != FRAMES_PER_MICRO_TURN:
      raise ValueError(
        f"config model.frames_per_position={spec.row.frames_per_position}: episode data has "
        f"{FRAMES_PER_MICRO_TURN} dMel frames per micro-turn in {AUDIO_POSITIONS_PER_MICRO_TURN} audio positions, "
        f"so it must be {FRAMES_PER_MICRO_TURN // AUDIO_POSITIONS_PER_MICRO_TURN}"
      )
    if spec.on_error not in ("raise", "skip"):
      raise ValueError(f"config data.on_error={spec.on_error!r}: expected 'raise' or 'skip'")
    self.spec = spec
    self.tokenizer = tokenizer
    self.readers = [EpisodeReader(m.path) for m in spec.mixture]
    stages = spec.stages or ((0, tuple(m.weight for m in spec.mixture)),)
    self._stage_starts = np.array([start for start, _ in stages], np.int64)
    self._stage_p = [np.array(w, np.float64) / np.sum(w) for _, w in stages]
    self._dataset_p = self._stage_p[0]
    self._episode_p = []
    for m, reader in zip(spec.mixture, self.readers):
      counts = np.array([e.num_micro_turns for e in reader.episodes], np.float64)
      if counts.sum() == 0:
        raise ValueError(f"config data.mixture: dataset {m.path} has no episode with a whole micro-turn")
      self._episode_p.append(counts / counts.sum())
    parts = [f"{p:.6f}:{r.fingerprint()}" for p, r in zip(self._dataset_p, self.readers)]
    for start, p in zip(self._stage_starts[1:], self._stage_p[1:]):  # a staged mixture's later stages
      parts.append(f"from {start}:" + ",".join(f"{x:.6f}" for x in p))
    self.fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    self._key = int(self.fingerprint[:8], 16)
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  # -- episodes ------------------------------------------------------------------------------

  def load(self, dataset: int, episode: int) -> tuple[EpisodeHeader, Layout]:
    """Reads, validates and aligns one episode's header record (cached); raises DataError when it
    is bad."""
    key = (dataset, episode)
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        hit = self._cache[key]
        if isinstance(hit, DataError):
          raise hit
        return hit
    reader = self.readers[dataset]
    try:
      head = reader.header(episode)
      info = reader.episodes[episode]
      where = f"{reader.directory / info.shard} record {info.index} (episode {info.id!r})"
      value: tuple | DataError = (head, align(head, self.tokenizer, self.spec.align, where))
    except DataError as e:
      value = e
    with self._lock:
      self._cache[key] = value
      while len(self._cache) > max(self.spec.cache_size, 1):
        self._cache.popitem(last=False)
    if isinstance(value, DataError):
      raise value
    return value

  # -- planning ------------------------------------------------------------------------------

  def dataset_p(self, step: int) -> np.ndarray:
    """The mixture's dataset probabilities at `step` (its weight stage's)."""
    return self._stage_p[int(np.searchsorted(self._stage_starts, step, side="right")) - 1]

  def dataset_of(self, step: int, index: int) -> int:
    """The mixture entry row (step, index) is drawn from (its generator's first draw)."""
    return int(self._rng(step, index).choice(len(self.readers), p=self.dataset_p(step)))

  def _rng(self, step: int, index: int) -> np.random.Generator:
    return np.random.default_rng([self.spec.seed, self._key, step, index])

  def plan(self, step: int, index: int, read_media: bool = True) -> tuple[list[Window], dict[str, np.ndarray]]:
    """The windows that fill row (step, index), and the counts of windows used and skipped.

    With `read_media` each window's media chunks are read (and checked) here, so a bad chunk is
    skipped like a bad header; without, the plan assumes every chunk is readable (for statistics
    over many rows)."""
    rng = self._rng(step, index)
    d = int(rng.choice(len(self.readers), p=self.dataset_p(step)))
    stats = empty_stats()
    windows: list[Window] = []
    room = self.spec.row.seq_len
    patch_room = self.spec.row.max_patches
    skips = 0
    while True:
      e = int(rng.choice(len(self._episode_p[d]), p=self._episode_p[d]))
      try:
        head, layout = self.load(d, e)
        start = max(0, int(rng.integers(1 - self._span(layout, room), len(layout))))
        n, used, patches = self._fit(layout, start, room, patch_room)
        # The chunks of windows start-1 .. start+n+1: the audio context of dMel frames on both sides.
        media = self.readers[d].span(e, head, start - 1, start + n + 2) if read_media and n else None
      except DataError as err:
        if self.spec.on_error == "raise":
          raise
        stats[f"skipped_{err.reason}"] += 1
        skips += 1
        if skips >= _MAX_CONSECUTIVE_SKIPS:
          raise DataError(err.reason, err.where, f"{skips} bad episodes drawn in a row; last: {err}") from None
        continue
      skips = 0
      if n == 0:
        return windows, stats
      room -= used
      patch_room -= patches
      windows.append(Window(d, e, start, n, media))
      stats["windows"] += 1

  def _span(self, layout: Layout, room: int) -> int:
    """About how many micro-turns of `layout` a window of `room` positions holds (at least 1)."""
    span = max(1, int(room * len(layout) // max(int(layout.sizes.sum()), 1)))
    return min(span, self.spec.max_window) if self.spec.max_window > 0 else span

  def _fit(self, layout: Layout, start: int, room: int, patch_room: int) -> tuple[int, int, int]:
    """How many micro-turns from `start` fit `room` positions and `patch_room` patches, and the
    positions and patches they take."""
    stop = len(layout) if self.spec.max_window <= 0 else min(len(layout), start + self.spec.max_window)
    n = used = patches = 0
    for t in range(start, stop):
      p = layout.patches_per_frame if layout.frame[t] >= 0 else 0
      if used + layout.sizes[t] > room or patches + p > patch_room:
        break
      used += int(layout.sizes[t])
      patches += p
      n += 1
    return n, used, patches

  # -- rows ----------------------------------------------------------------------------------

  def row(self, step: int, index: int) -> dict[str, np.ndarray]:
    return self.row_and_stats(step, index)[0]

  def row_and_stats(self, step: int, index: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    windows, stats = self.plan(step, index)
    out = self.spec.row.empty_row()
    pos = num_patches = 0
    for segment, w in enumerate(windows, start=1):
      pos, num_patches = self._write_window(out, w, segment, pos, num_patches)
    return out, stats

  def _write_window(self, out: dict, w: Window, segment: int, pos: int, num_patches: int) -> tuple[int, int]:
    _, layout = self.load(w.dataset, w.episode)
    if w.media is None:
      raise ValueError("rows are written from windows planned with read_media=True")
    turns = microturn.window_micro_turns(layout, w.media, w.start, w.length, causal=self.spec.causal)
    first = pos
    pos, num_patches = microturn.write_window(out, turns, segment, pos, num_patches)
    planned = int(layout.sizes[w.start : w.start + w.length].sum())
    if pos - first != planned:  # rows are planned from `sizes` without media; a mismatch would overflow them
      raise RuntimeError(
        f"dataset {w.dataset} episode {w.episode} micro-turns [{w.start}, {w.start + w.length}) took "
        f"{pos - first} positions; the alignment planned {planned}"
      )
    return pos, num_patches
