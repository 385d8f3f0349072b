"""Config validation: every error names the field and says what is wrong and what to do.

`validate(config, num_devices)` checks a ConfigDict against the schema of `experiments/base.py`
(unknown or missing keys, wrong types, non-finite floats), builds each subsystem's config
dataclass from its group (ModelConfig, OptimizerConfig, StreamConfig: their modes are Literal
types and their ranges are checked in their `__post_init__`, `tmlx.fields`), re-raising an error
with the field's path, and checks what spans groups (data against the model, the mesh) and the
groups that have no dataclass (data, loss, train, checkpoint, logging, eval, profile, runtime) here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import ml_collections

from data_pipelines import pipeline
from data_pipelines.contract import (
  AUDIO_POSITIONS_PER_MICRO_TURN,
  FRAMES_PER_MICRO_TURN,
  PATCH_SIZE,
  min_positions_per_micro_turn,
)
from experiments import base
from tmlx import fields, profiling, sharding
from tmlx.errors import ConfigError
from tmlx.nn.model import ModelConfig
from tmlx.optim import OptimizerConfig
from tmlx.runtime import accelerators
from tmlx.stream.config import StreamConfig

# The modes of the groups without a dataclass; the dataclasses' modes are their Literal fields.
CHOICES = {
  "data.source": pipeline.SOURCES,
  "data.on_error": pipeline.ON_ERROR,
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
    if name in CHOICES and value not in CHOICES[name]:
      raise ConfigError(f"config.{name}={value!r}: expected one of {CHOICES[name]}")


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


def _field(config, name: str):
  """The value of dotted field `name` ('optimizer.b1')."""
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def _in_range(config, name: str, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
  _group_check(fields.in_range, config, name, low, high, high_open=high_open)


def _group_check(check, config, name: str, *args, **kwargs) -> None:
  """`check` (a tmlx.fields check) of dotted field `name`, its error naming config.<name>."""
  group, _, leaf = name.rpartition(".")
  try:
    check(_field(config, group), leaf, *args, **kwargs)
  except fields.FieldError as e:
    raise ConfigError(str(e.at(f"config.{group}."))) from None


def _check_datasets(value: str, field: str) -> None:
  """DIR:WEIGHT entries of data.mixture / eval.data: each weight a finite number > 0."""
  from data_pipelines.episode_source import parse_mixture

  try:
    entries = parse_mixture(value)
  except ValueError as e:
    raise ConfigError(f"config.{field}={value!r}: {str(e).removeprefix('config data.mixture').lstrip(': ')}") from None
  for entry in entries:
    if not math.isfinite(entry.weight):
      raise ConfigError(f"config.{field}: weight {entry.weight} of {entry.path!r} must be a finite number > 0")


def _positive(config, *names: str) -> None:
  for name in names:
    _group_check(fields.positive, config, name)


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
  m, d = config.model, config.data
  _build(ModelConfig, config, "model")
  _build(OptimizerConfig, config, "optimizer")
  try:
    StreamConfig.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _positive(
    config,
    "data.seq_len",
    "data.global_batch_size",
    "data.k_max",
    "data.text_only_k_max",
    "train.num_steps",
    "logging.every",
    "checkpoint.keep",  # 0 would keep nothing, and the next run would start from scratch
  )
  for name in ("checkpoint.every", "checkpoint.keep_every", "runtime.cpu_devices", "train.max_consecutive_bad_steps"):
    _in_range(config, name, 0, math.inf)
  for side, px in (("frame_height", d.frame_height), ("frame_width", d.frame_width)):
    if px < 0 or px % PATCH_SIZE:
      raise ConfigError(f"config.data.{side}={px}: must be a multiple of the {PATCH_SIZE}-pixel patch")
  rows, cols = d.frame_height // PATCH_SIZE, d.frame_width // PATCH_SIZE
  if rows > m.max_grid_rows or cols > m.max_grid_cols:
    raise ConfigError(
      f"config.data.frame_height/frame_width={d.frame_height}x{d.frame_width} gives a "
      f"{rows}x{cols} patch grid, larger than config.model.max_grid_rows/cols="
      f"{m.max_grid_rows}x{m.max_grid_cols}"
    )
  if rows * cols > d.max_patches:
    raise ConfigError(f"config.data.max_patches={d.max_patches} cannot hold one {rows}x{cols}-patch frame")
  need = min_positions_per_micro_turn(rows * cols)
  if d.seq_len < need:
    raise ConfigError(
      f"config.data.seq_len={d.seq_len} is too short for one micro-turn: it needs {need} "
      f"positions (<mt>, {rows * cols} patches, 4 AUDIO_IN, <eot>, 4 AUDIO_OUT)"
    )
  if d.source == "episodes":
    if not d.mixture.strip():
      raise ConfigError("config.data.mixture is empty: data.source='episodes' needs DIR:WEIGHT entries")
    _check_datasets(d.mixture, "data.mixture")
    a, frames = AUDIO_POSITIONS_PER_MICRO_TURN, FRAMES_PER_MICRO_TURN
    if m.frames_per_position * a != frames:
      raise ConfigError(
        f"config.model.frames_per_position={m.frames_per_position}: episode data has {frames} dMel frames per "
        f"micro-turn in {a} audio positions, so it must be {frames // a}"
      )
  if config.loss.burn_in_micro_turns < 0:
    raise ConfigError(f"config.loss.burn_in_micro_turns={config.loss.burn_in_micro_turns}: must be >= 0")
  if config.eval.every < 0:
    raise ConfigError(f"config.eval.every={config.eval.every}: must be >= 0 (0: no duplex evaluation)")
  if config.eval.every > 0:
    _positive(config, "eval.conversations")
    if not config.eval.data.strip():
      raise ConfigError("config.eval.data is empty: config.eval.every > 0 needs held-out episode datasets")
  if not 0 <= d.max_skip_ratio <= 1:
    raise ConfigError(f"config.data.max_skip_ratio={d.max_skip_ratio}: must be a fraction in [0, 1]")
  if d.global_batch_size % config.optimizer.grad_accum_steps:
    raise ConfigError(
      f"config.data.global_batch_size={d.global_batch_size} is not divisible by "
      f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}"
    )
  step_list(config.train.inject_nan_at_steps, "train.inject_nan_at_steps")
  _in_range(config, "profile.start_step", 0, math.inf)
  if config.profile.start_step:
    _positive(config, "profile.num_steps")
  try:
    profiling.processes(config.profile.processes)
  except ValueError as e:
    raise ConfigError(str(e)) from None
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
  micro = d.global_batch_size // config.optimizer.grad_accum_steps
  if micro % ways:
    raise ConfigError(
      f"config.data.global_batch_size={d.global_batch_size} (per micro-batch {micro}) is not "
      f"divisible by the data axes of the mesh ({' x '.join(axes)} = {ways})"
    )


def step_list(value: str, field: str) -> tuple[int, ...]:
  """'3, 5,9' → (3, 5, 9): a comma-separated list of positive step numbers in config.<field>."""
  try:
    steps = tuple(int(part) for part in str(value).split(",") if part.strip())
  except ValueError:
    steps = (0,)
  if any(s < 1 for s in steps):
    raise ConfigError(f"config.{field}={value!r}: expected comma-separated step numbers ≥ 1, e.g. '3,5'")
  return steps


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short, stable hash of the resolved config."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["ConfigError", "config_hash", "step_list", "validate"]
