"""`config.data` as a dataclass: its modes are Literal types and its ranges are checked when it is
built (`tmlx.config.validate` builds it). experiments/base.py says what
each field does. What depends on the model as well (the patch grid, the dMel frames per position)
is checked by `tmlx.config`."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from data_pipelines.contract import PATCH_SIZE, min_positions_per_micro_turn
from data_pipelines.episode_source import parse_stages
from tmlx import fields


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """`config.data.synthetic`: the learnable synthetic conversations (`data_pipelines.synthetic`,
  which checks `num_words` against its word list)."""

  num_words: int
  min_window: int
  max_window: int
  video_prob: float
  typed_text_prob: float

  def __post_init__(self):
    fields.positive(self, "min_window")
    if self.max_window < self.min_window:
      raise fields.FieldError(f"@max_window={self.max_window}: must be >= @min_window={self.min_window}")
    fields.in_range(self, "video_prob", 0.0, 1.0)
    fields.in_range(self, "typed_text_prob", 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`."""

  source: Literal["synthetic", "episodes"]
  mixture: str
  tokenizer: str
  audio_causal: bool
  max_window: int
  on_error: Literal["raise", "skip"]
  max_skip_ratio: float
  episode_cache: int
  seq_len: int
  global_batch_size: int
  max_patches: int
  frame_height: int
  frame_width: int
  k_max: int
  text_only_k_max: int
  num_threads: int
  prefetch: int
  num_workers: int
  synthetic: SyntheticConfig

  def __post_init__(self):
    fields.literals(self)
    fields.positive(self, "seq_len", "global_batch_size", "k_max", "text_only_k_max")
    for side in ("frame_height", "frame_width"):
      px = getattr(self, side)
      if px < 0 or px % PATCH_SIZE:
        raise fields.FieldError(f"@{side}={px}: must be a multiple of the {PATCH_SIZE}-pixel patch")
    rows, cols = self.patch_grid
    if rows * cols > self.max_patches:
      raise fields.FieldError(f"@max_patches={self.max_patches} cannot hold one {rows}x{cols}-patch frame")
    need = min_positions_per_micro_turn(rows * cols)
    if self.seq_len < need:
      raise fields.FieldError(
        f"@seq_len={self.seq_len} is too short for one micro-turn: it needs {need} "
        f"positions (<mt>, {rows * cols} patches, 4 AUDIO_IN, <eot>, 4 AUDIO_OUT)"
      )
    if self.source == "episodes":
      if not self.mixture.strip():
        raise fields.FieldError("@mixture is empty: @source='episodes' needs DIR:WEIGHT entries")
      self._check_mixture()
    if not 0 <= self.max_skip_ratio <= 1:
      raise fields.FieldError(f"@max_skip_ratio={self.max_skip_ratio}: must be a fraction in [0, 1]")
    for name in ("max_window", "episode_cache", "num_threads", "prefetch", "num_workers"):
      fields.in_range(self, name, 0)

  def _check_mixture(self) -> None:
    """DIR:WEIGHT entries (in weight stages, `parse_stages`), each weight a finite number > 0."""
    try:
      entries, stages = parse_stages(self.mixture)
    except ValueError as e:
      reason = str(e).removeprefix("config data.mixture").lstrip(": ").replace("@", "@@")
      raise fields.FieldError(f"@mixture={fields.shown(self.mixture)}: {reason}") from None
    for _, weights in stages:
      for entry, weight in zip(entries, weights):
        if not math.isfinite(weight):
          where = fields.shown(entry.path)
          raise fields.FieldError(f"@mixture: weight {weight} of {where} must be a finite number > 0")

  @property
  def patch_grid(self) -> tuple[int, int]:
    """(rows, columns) of whole patches in a frame."""
    return self.frame_height // PATCH_SIZE, self.frame_width // PATCH_SIZE


SOURCES = fields.choices(DataConfig, "source")
