"""`config.runtime` as a dataclass: how a process of a run starts (its fake CPU devices, its
compilation cache). Imports neither JAX nor flax, like the rest of start-up."""

from __future__ import annotations

import dataclasses

from tmlx import fields


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """`config.runtime` (experiments/base.py says what each field does)."""

  cpu_devices: int
  compile_cache: bool
  compile_cache_dir: str

  def __post_init__(self):
    fields.in_range(self, "cpu_devices", 0)
