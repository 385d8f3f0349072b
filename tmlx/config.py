"""Config validation: every error names the field and says what is wrong and what to do.

`validate(config, num_devices)` checks a ConfigDict against the schema of `experiments/base.py`
(unknown or missing keys, wrong types, non-finite floats), then builds each group's dataclass
(GROUPS: their modes are Literal types and their ranges are checked in their `__post_init__`,
`tmlx.fields`), re-raising an error with the field's path, and last checks what spans groups:
the data against the model, the batch against gradient accumulation, and the mesh.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import ml_collections

from data_pipelines.contract import AUDIO_POSITIONS_PER_MICRO_TURN, FRAMES_PER_MICRO_TURN
from data_pipelines.data_config import DataConfig
from experiments import base
from tmlx import fields, sharding
from tmlx.checkpoint.manager import CheckpointConfig
from tmlx.errors import ConfigError
from tmlx.eval.evaluation import EvalConfig
from tmlx.faults import TrainConfig
from tmlx.losses import LossSettings
from tmlx.metrics import LoggingConfig
from tmlx.nn.model import ModelConfig
from tmlx.optim import OptimizerConfig
from tmlx.profiling import ProfileConfig
from tmlx.runtime import accelerators
from tmlx.runtime.config import RuntimeConfig
from tmlx.state import InitConfig
from tmlx.stream.config import StreamConfig

# The dataclass of each group of the config, built (and so checked) in this order. `stream` has
# its own (StreamConfig, which reads some data fields too), `mesh` is checked by tmlx.sharding and
# `mesh_rules` by tmlx.runtime.accelerators.
GROUPS = {
  "model": ModelConfig,
  "optimizer": OptimizerConfig,
  "data": DataConfig,
  "train": TrainConfig,
  "logging": LoggingConfig,
  "checkpoint": CheckpointConfig,
  "runtime": RuntimeConfig,
  "loss": LossSettings,
  "eval": EvalConfig,
  "init": InitConfig,
  "profile": ProfileConfig,
}


_GROUP = (Mapping, ml_collections.ConfigDict)


def _check_schema(config, schema, prefix: str) -> None:
  unknown = sorted(set(config.keys()) - set(schema.keys()))
  if unknown:
    raise ConfigError(
      f"config.{prefix}{unknown[0]}: unknown key (not defined in experiments/base.py); "
      "check the spelling, or define and document it in base.py"
    )
  missing = sorted(set(schema.keys()) - set(config.keys()))
  if missing:
    raise ConfigError(f"config.{prefix}{missing[0]}: missing (experiments/base.py defines it)")
  for key, ref in schema.items():
    value, name = config[key], f"{prefix}{key}"
    if name == "mesh_rules":  # rows named by the experiment, each with a fixed set of fields
      accelerators.check_rules(value)
      continue
    if isinstance(ref, _GROUP):
      if not isinstance(value, _GROUP):
        raise ConfigError(f"config.{name}: expected a group of fields, got {type(value).__name__}")
      _check_schema(value, ref, name + ".")
      continue
    if not _same_type(value, ref):
      raise ConfigError(f"config.{name}={value!r}: wrong type {type(value).__name__}, expected {type(ref).__name__}")


def _same_type(value, ref) -> bool:
  """Whether `value` may stand where base.py has `ref` (an int may stand for a float)."""
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(ref, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def _finite_floats(config, schema, prefix: str = "") -> None:
  """Every float field is a finite number (nan and inf pass the type check, and then break the
  run only once it computes with them)."""
  for key, ref in schema.items():
    if f"{prefix}{key}" == "mesh_rules":
      continue
    if isinstance(ref, _GROUP):
      _finite_floats(config[key], ref, f"{prefix}{key}.")
    elif isinstance(ref, float) and not math.isfinite(config[key]):
      raise ConfigError(f"config.{prefix}{key}={config[key]}: must be a finite number")


def _build(cls, config, group: str):
  """`cls` from `config.<group>`; a bad field raises ConfigError naming config.<group>.<field>."""
  try:
    return fields.build(cls, config[group])
  except fields.FieldError as e:
    raise ConfigError(str(e.at(f"config.{group}."))) from None


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first bad field. `num_devices` enables the mesh checks."""
  schema = base.get_config()
  _check_schema(config, schema, "")
  _finite_floats(config, schema)
  groups = {name: _build(cls, config, name) for name, cls in GROUPS.items()}
  try:
    StreamConfig.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  m, d = groups["model"], groups["data"]
  rows, cols = d.patch_grid
  if rows > m.max_grid_rows or cols > m.max_grid_cols:
    raise ConfigError(
      f"config.data.frame_height/frame_width={d.frame_height}x{d.frame_width} gives a "
      f"{rows}x{cols} patch grid, larger than config.model.max_grid_rows/cols="
      f"{m.max_grid_rows}x{m.max_grid_cols}"
    )
  a, frames = AUDIO_POSITIONS_PER_MICRO_TURN, FRAMES_PER_MICRO_TURN
  if d.source == "episodes" and m.frames_per_position * a != frames:
    raise ConfigError(
      f"config.model.frames_per_position={m.frames_per_position}: episode data has {frames} dMel frames per "
      f"micro-turn in {a} audio positions, so it must be {frames // a}"
    )
  accum = groups["optimizer"].grad_accum_steps
  if d.global_batch_size % accum:
    raise ConfigError(
      f"config.data.global_batch_size={d.global_batch_size} is not divisible by "
      f"config.optimizer.grad_accum_steps={accum}"
    )
  try:
    table = sharding.rules_table(config.mesh.rules)
  except sharding.ShardingError as e:
    raise ConfigError(str(e)) from None
  if num_devices is None:
    return
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices)
  except sharding.ShardingError as e:
    raise ConfigError(str(e)) from None
  if m.moe.num_experts % sizes["expert"]:
    raise ConfigError(
      f"config.model.moe.num_experts={m.moe.num_experts} is not divisible by the mesh's expert "
      f"axis (config.mesh.expert → {sizes['expert']}); each expert shard must hold whole experts"
    )
  ways = sharding.batch_axes_size(sizes, table)
  axes = [f"{a}={sizes[a]}" for a in table.get("batch", ())]
  micro = d.global_batch_size // accum
  if micro % ways:
    raise ConfigError(
      f"config.data.global_batch_size={d.global_batch_size} (per micro-batch {micro}) is not "
      f"divisible by the data axes of the mesh ({' x '.join(axes)} = {ways})"
    )


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short, stable hash of the resolved config."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["GROUPS", "ConfigError", "config_hash", "validate"]
