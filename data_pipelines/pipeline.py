"""Grain pipelines that yield process-local batches in the packed-batch contract.

The row at (step, row) is a pure function of the seed, the data spec and those two indices, so
resuming needs only the step, every process computes exactly its own rows of the global batch, and
worker processes (`data.num_workers`) change the speed, never the output. Grain is imported by
`make_dataset` only, so that a command can check its paths and configs before loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from data_pipelines.align import AlignSpec
from data_pipelines.contract import RowSpec
from data_pipelines.data_config import SOURCES
from data_pipelines.episode import MANIFEST
from data_pipelines.episode_source import (
  EpisodeSource,
  EpisodeSourceSpec,
  empty_stats,
  locate,
  parse_mixture,
  parse_stages,
)
from data_pipelines.synthetic import SyntheticSource, SyntheticSpec
from data_pipelines.tokenizer import make_tokenizer
from tmlx import paths

if TYPE_CHECKING:
  import grain

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def resolve_dirs(spec: str) -> list:
  """Comma-separated dataset directories (pathlib paths, or epath ones for object-store URLs), each
  relative one looked up in the working directory, then in the project root (as `data.mixture`
  entries are)."""
  out = []
  for part in (p.strip() for p in spec.split(",")):
    if paths.is_remote(part):
      out.append(paths.path(part.rstrip("/")))
    elif part:
      out.append(locate(part, PROJECT_ROOT))
  return out


def missing_paths(config: ml_collections.ConfigDict) -> list[str]:
  """What the configured source would read but is not there: each a line naming the config field
  and the path. Checks existence only, reading nothing (no manifest, no model, no Grain)."""
  d = config.data
  out = []
  if d.source == "episodes":
    for m in parse_mixture(d.mixture, root=PROJECT_ROOT):
      if not paths.is_file(paths.join(m.path, MANIFEST)):
        out.append(
          f"config data.mixture: {m.path}: no episode dataset here (no {MANIFEST}); "
          "build one with `python -m data_pipelines.build`"
        )
  kind, sep, path = str(d.tokenizer).partition(":")
  if kind == "sentencepiece" and sep and path and not os.path.isfile(path):
    out.append(f"config data.tokenizer: {path}: no SentencePiece model here")
  return out


def row_spec(config: ml_collections.ConfigDict) -> RowSpec:
  return RowSpec(
    seq_len=config.data.seq_len,
    frames_per_position=config.model.frames_per_position,
    max_patches=config.data.max_patches,
  )


def make_source(config: ml_collections.ConfigDict):
  """The configured row source: an object with `row(step, index) -> dict`."""
  d = config.data
  if d.source == "synthetic":
    return SyntheticSource(
      SyntheticSpec(
        row=row_spec(config),
        seed=config.seed,
        num_words=d.synthetic.num_words,
        min_window=d.synthetic.min_window,
        max_window=d.synthetic.max_window,
        video_prob=d.synthetic.video_prob,
        typed_text_prob=d.synthetic.typed_text_prob,
        k_max=d.k_max,
        frame_height=d.frame_height,
        frame_width=d.frame_width,
      )
    )
  if d.source == "episodes":
    entries, stages = parse_stages(d.mixture, root=PROJECT_ROOT)
    return EpisodeSource(
      EpisodeSourceSpec(
        row=row_spec(config),
        seed=config.seed,
        mixture=tuple(entries),
        stages=stages,
        align=AlignSpec(
          k_max=d.k_max,
          text_only_k_max=d.text_only_k_max,
          frame_height=d.frame_height,
          frame_width=d.frame_width,
          vocab_size=config.model.vocab_size,
        ),
        causal=d.audio_causal,
        max_window=d.max_window,
        on_error=d.on_error,
        cache_size=d.episode_cache,
      ),
      make_tokenizer(d.tokenizer),
    )
  raise ValueError(f"config.data.source={d.source!r} is not a known source; known: {SOURCES}")


def data_spec_hash(config: ml_collections.ConfigDict) -> str:
  """A hash of everything the rows depend on: the seed, `config.data`, the row geometry and, for
  episode data, the datasets' manifests and weights. A checkpoint records it with its step."""
  parts = {"seed": config.seed, "data": config.data.to_dict(), "frames_per_position": config.model.frames_per_position}
  if config.data.source == "episodes":
    parts["episodes"] = make_source(config).fingerprint
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row_and_stats(source, step: int, index: int) -> tuple[dict, dict]:
  if isinstance(source, EpisodeSource):
    return source.row_and_stats(step, index)
  stats = empty_stats()
  row = source.row(step, index)
  stats["windows"] += int(row["segment_ids"].max(initial=0))
  return row, stats


def stacked_rows(config: ml_collections.ConfigDict, step: int = 0, rows: int | None = None) -> dict[str, np.ndarray]:
  """Rows 0..rows-1 of `step` (default: the whole global batch) from the configured source, stacked
  into one host batch, without Grain: for tests and benchmarks."""
  source = make_source(config)
  per_row = [source.row(step, r) for r in range(rows or config.data.global_batch_size)]
  return {k: np.stack([r[k] for r in per_row]) for k in per_row[0]}


def make_dataset(
  config: ml_collections.ConfigDict,
  *,
  start_step: int,
  num_steps: int,
  process_index: int,
  process_count: int,
) -> grain.IterDataset:
  """(batch, stats) for steps [start_step, num_steps), each batch holding this process's rows.

  A batch is a dict of numpy arrays of shape [global_batch / process_count, ...] (see
  `data_pipelines.contract`); stats holds this process's counts, summed over its rows, of windows
  packed and bad episodes skipped per reason (`episode_source.STAT_KEYS`).
  """
  global_batch = config.data.global_batch_size
  if global_batch % process_count:
    raise ValueError(f"config.data.global_batch_size={global_batch} is not divisible by the {process_count} processes")
  import grain

  local = global_batch // process_count
  source = make_source(config)

  def make_row(i: int) -> tuple[dict, dict]:
    step, r = divmod(i, local)
    return _row_and_stats(source, step, process_index * local + r)

  def sum_stats(element):
    batch, stats = element
    return batch, {k: v.sum() for k, v in stats.items()}

  ds = grain.MapDataset.range(num_steps * local).map(make_row).batch(local, drop_remainder=True).map(sum_stats)
  ds = ds[start_step:].to_iter_dataset(
    grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
  )
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds
