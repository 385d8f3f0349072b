"""Pod plan: per-device memory of parameters and optimizer state, without any device.

`python -m tmlx.plan --config=experiments/tml_interaction_small.py --devices=256`

The mesh is an AbstractMesh (axis names and sizes only) and the train state comes from
`jax.eval_shape`, so this runs on a laptop for any pod size, and tells before a launch whether a
mesh fits the chips. It counts what lives on the device between steps: parameters, optimizer
state and the step counter. Gradients (one more parameter-sized buffer during the step),
activations and XLA temporaries come on top.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import ml_collections
import optax
from jax.sharding import PartitionSpec

from tmlx import config as config_lib
from tmlx import sharding, train

# Chip memory in decimal GB as vendors quote it (an H100 has 80 GB, a TPU v5p chip 95 GB).
# Decimal is the smaller reading of "GB", so fractions against it err on the safe side.
GB = 1e9
CHIPS = {"H100 80GB": 80 * GB, "TPU v5p 95GB": 95 * GB}
# Optimizer leaves that belong to no parameter (Adam's count, the schedule's step, TrainState.step).
SCALARS = "(scalars)"


@dataclasses.dataclass(frozen=True)
class PlanRow:
  group: str  # top-level parameter group, e.g. 'text_embed' or 'blocks/moe'
  num_params: int  # parameters in the group, unsharded
  global_bytes: int  # parameter bytes of the group, unsharded
  param_bytes: int  # parameter bytes of the group on one device
  opt_bytes: int  # optimizer-state bytes of the group on one device


@dataclasses.dataclass(frozen=True)
class PodPlan:
  mesh: dict[str, int]  # axis sizes, in sharding.MESH_AXES order
  rows: tuple[PlanRow, ...]
  param_bytes: int  # per device
  opt_bytes: int  # per device, optimizer state and step counter
  global_bytes: int  # parameters + optimizer state + step, unsharded

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def total_bytes(self) -> int:
    """Per device: parameters + optimizer state."""
    return self.param_bytes + self.opt_bytes

  def fraction(self, chip_bytes: float) -> float:
    return self.total_bytes / chip_bytes


@dataclasses.dataclass(frozen=True)
class VariableLayout:
  shape: tuple[int, ...]
  dtype: str  # numpy name, e.g. 'float32'
  spec: PartitionSpec  # over the mesh's axes, from the logical names and config.mesh.rules


def abstract_mesh(mesh_config, num_devices: int) -> jax.sharding.AbstractMesh:
  """The experiment's mesh as names and sizes only (no devices), in GSPMD (Auto) mode like make_mesh."""
  sizes = sharding.mesh_shape(mesh_config, num_devices)
  return jax.sharding.AbstractMesh(
    tuple(sizes[a] for a in sharding.MESH_AXES),
    sharding.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
  )


def _group(path) -> str:
  """'blocks' is the scanned layer stack, nearly all the model, so it is split by sublayer."""
  keys = [str(k.key) for k in path]
  return "/".join(keys[:2] if keys[0] == "blocks" and len(keys) > 2 else keys[:1])


def _shard_bytes(shape_dtype, named_sharding) -> int:
  # shard_shape divides each dim by the mesh axes of its PartitionSpec entry; a replicated leaf
  # (a scalar count, PartitionSpec()) keeps its full shape and so counts fully on every device.
  shard = named_sharding.shard_shape(shape_dtype.shape)
  return math.prod(shard) * shape_dtype.dtype.itemsize


def _bytes(shape_dtype) -> int:
  return math.prod(shape_dtype.shape) * shape_dtype.dtype.itemsize


def _state_spec(config: ml_collections.ConfigDict, mesh) -> train.StateSpec:
  return train.state_spec(config, mesh, sharding.rules_table(config.mesh.rules))


def variable_layouts(config: ml_collections.ConfigDict, mesh) -> dict[str, dict[str, VariableLayout]]:
  """Shape, dtype and PartitionSpec of every model variable of `config` on `mesh` (a Mesh or an
  AbstractMesh), as {'params': {path: layout}, 'model_state': {path: layout}} with '/'-joined paths.

  This is the layout a run gives its state (the optimizer state follows the parameters), in a form
  that can be printed, compared and stored: the golden files of tests/test_golden.py hold it.
  """
  spec = _state_spec(config, mesh)

  def table(abstract: dict, shardings: dict) -> dict[str, VariableLayout]:
    out = {}
    for (path, x), s in zip(jax.tree.leaves_with_path(abstract), jax.tree.leaves(shardings), strict=True):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      out[name] = VariableLayout(tuple(x.shape), x.dtype.name, s.spec)
    return out

  return {
    "params": table(spec.abstract.params, spec.shardings.params),
    "model_state": table(spec.abstract.model_state, spec.shardings.model_state),
  }


def plan(config: ml_collections.ConfigDict, num_devices: int) -> PodPlan:
  """Per-device parameter and optimizer bytes of `config` on a pod of `num_devices` chips."""
  config_lib.validate(config, num_devices)
  mesh = abstract_mesh(config.mesh, num_devices)
  spec = _state_spec(config, mesh)
  state, shardings = spec.abstract, spec.shardings

  groups = jax.tree.map_with_path(lambda path, _: _group(path), state.params)
  # The optimizer state mirrors the parameters inside Adam's mu and nu; map each of its leaves to
  # the group of its parameter the same way state_spec maps shardings onto it.
  opt_groups = jax.tree.leaves(
    optax.tree_map_params(spec.tx, lambda _, g: g, state.opt_state, groups, transform_non_params=lambda _: SCALARS)
  )
  names = list(dict.fromkeys(jax.tree.leaves(groups)))
  num = dict.fromkeys(names, 0)
  glob = dict.fromkeys(names, 0)
  per_param = dict.fromkeys(names, 0)
  per_opt = dict.fromkeys([*names, SCALARS], 0)
  for g, x, s in zip(jax.tree.leaves(groups), jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
    num[g] += math.prod(x.shape)
    glob[g] += _bytes(x)
    per_param[g] += _shard_bytes(x, s)
  opt_leaves, opt_shardings = jax.tree.leaves(state.opt_state), jax.tree.leaves(shardings.opt_state)
  if not len(opt_groups) == len(opt_leaves) == len(opt_shardings):
    raise AssertionError(f"optimizer state has {len(opt_leaves)} leaves but {len(opt_groups)} were grouped")
  for g, x, s in zip(opt_groups, opt_leaves, opt_shardings):
    per_opt[g] += _shard_bytes(x, s)
  per_opt[SCALARS] += _shard_bytes(state.step, shardings.step)

  rows = tuple(PlanRow(g, num[g], glob[g], per_param[g], per_opt[g]) for g in names)
  rows += (PlanRow(SCALARS, 0, 0, 0, per_opt[SCALARS]),)
  global_bytes = sum(_bytes(x) for x in jax.tree.leaves(state))
  return PodPlan(
    mesh=dict(mesh.shape),
    rows=rows,
    param_bytes=sum(r.param_bytes for r in rows),
    opt_bytes=sum(r.opt_bytes for r in rows),
    global_bytes=global_bytes,
  )


def _count(n: int) -> str:
  for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n) if n else ""


def format_plan(p: PodPlan) -> str:
  mesh = " x ".join(f"{a}={n}" for a, n in p.mesh.items())
  lines = [
    f"mesh {mesh} ({p.num_devices} devices)",
    "",
    f"{'group':<20} {'params':>9} {'global GB':>10} {'param GB/dev':>13} {'opt GB/dev':>11}",
  ]
  total = PlanRow(
    "total",
    sum(r.num_params for r in p.rows),
    sum(r.global_bytes for r in p.rows),
    p.param_bytes,
    p.opt_bytes,
  )
  for r in (*p.rows, total):
    glob = f"{r.global_bytes / GB:.2f}" if r.global_bytes else ""
    lines.append(
      f"{r.group:<20} {_count(r.num_params):>9} {glob:>10} {r.param_bytes / GB:>13.3f} {r.opt_bytes / GB:>11.3f}"
    )
  lines.append("")
  lines.append(
    f"per device: parameters {p.param_bytes / GB:.2f} GB + optimizer state {p.opt_bytes / GB:.2f} GB"
    f" = {p.total_bytes / GB:.2f} GB"
  )
  lines += [f"  {p.fraction(b):5.1%} of one {chip}" for chip, b in CHIPS.items()]
  lines.append("not counted: gradients (about the parameter bytes again), activations, XLA temporaries")
  return "\n".join(lines)


def _cli() -> None:
  # Flags are defined only when run as a program: importing `plan` next to tmlx.main (tests do)
  # must not register a second --config.
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/tml_interaction_small.py.", lock_config=True
  )
  devices = flags.DEFINE_integer("devices", 256, "Devices in the pod; fills the mesh axis that is -1.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Shapes and shardings only: never open an accelerator (on a TPU VM that would also take the
    # chips from a training job running there).
    jax.config.update("jax_platforms", "cpu")
    try:
      p = plan(config.value, devices.value)
    except (config_lib.ConfigError, sharding.ShardingError) as e:
      sys.exit(f"invalid config: {e}")
    print(format_plan(p))

  app.run(main)


if __name__ == "__main__":
  _cli()


__all__ = ["CHIPS", "PlanRow", "PodPlan", "VariableLayout", "abstract_mesh", "format_plan", "plan", "variable_layouts"]
