"""Mesh construction, logical-axis rules and state shardings.

Modules name the dimensions of their parameters and activations with logical axes ('embed',
'expert', 'batch', ...). The rules table of the config (`experiments/base.py: DEFAULT_RULES`) maps
each logical axis to mesh axes; nothing else in tmlx knows the mesh layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tmlx.modes import MESH_AXES

Rules = Mapping[str, tuple[str, ...]]


class ShardingError(ValueError):
  """A mesh or rules table that cannot shard the model as asked."""


def _dcn_sizes(mesh_config) -> dict[str, int]:
  """Axis sizes across slices or hosts (`config.mesh.dcn`; all 1, or absent, for one ICI domain);
  -1 marks the one axis to fill."""
  dcn = mesh_config.get("dcn") if hasattr(mesh_config, "get") else None
  sizes = {a: int(dcn[a]) if dcn is not None and a in dcn else 1 for a in MESH_AXES}
  bad = [a for a, n in sizes.items() if n == 0 or n < -1]
  if bad:
    raise ShardingError(f"config.mesh.dcn.{bad[0]}={sizes[bad[0]]}: DCN axis sizes must be ≥ 1 or -1 (fill)")
  return sizes


def _fill(sizes: dict[str, int], total: int, where: str, prefix: str) -> dict[str, int]:
  known = math.prod(n for n in sizes.values() if n != -1)
  fill = [a for a, n in sizes.items() if n == -1]
  if fill:
    if total % known:
      raise ShardingError(
        f"config.{prefix}: {where} cannot fill axis {fill[0]!r}: the other axes multiply to {known}, "
        f"which does not divide {total}"
      )
    sizes = dict(sizes, **{fill[0]: total // known})
  if math.prod(sizes.values()) != total:
    raise ShardingError(
      f"config.{prefix}: axis sizes {sizes} multiply to {math.prod(sizes.values())} but there are "
      f"{where}; make the product equal that (or set one axis to -1)"
    )
  return sizes


def _ici_and_dcn(mesh_config, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
  """(ICI sizes, DCN sizes) with the one -1 of either filled so that they multiply to `num_devices`."""
  ici = {a: int(mesh_config[a]) for a in MESH_AXES}
  dcn = _dcn_sizes(mesh_config)
  bad = [a for a, n in ici.items() if n == 0 or n < -1]
  if bad:
    raise ShardingError(f"config.mesh.{bad[0]}={ici[bad[0]]}: axis sizes must be ≥ 1 or -1 (fill)")
  fills = [f"mesh.{a}" for a, n in ici.items() if n == -1] + [f"mesh.dcn.{a}" for a, n in dcn.items() if n == -1]
  if len(fills) > 1:
    raise ShardingError(f"config.mesh: only one axis size may be -1, got {', '.join(fills)}")
  if any(n == -1 for n in dcn.values()):  # the number of ICI domains follows from the devices
    dcn = _fill(dcn, num_devices // math.prod(ici.values()), f"{num_devices} devices", "mesh.dcn")
    if math.prod(ici.values()) * math.prod(dcn.values()) != num_devices:
      raise ShardingError(f"config.mesh: ICI sizes {ici} do not divide the {num_devices} devices")
    return ici, dcn
  granules = math.prod(dcn.values())
  if num_devices % granules:
    raise ShardingError(
      f"config.mesh.dcn: axis sizes {dcn} multiply to {granules}, which does not divide the {num_devices} devices"
    )
  where = f"{num_devices // granules} devices per ICI domain" if granules > 1 else f"{num_devices} devices"
  return _fill(ici, num_devices // granules, where, "mesh"), dcn


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Total axis sizes of the mesh over `num_devices`: ICI size x DCN size per axis."""
  ici, dcn = _ici_and_dcn(mesh_config, num_devices)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the axes of MESH_AXES, in GSPMD (Auto) mode.

  With `config.mesh.dcn` sizes above 1 it is a hybrid mesh: each axis is DCN-major, ICI-minor,
  the ICI part laid out within one granule (a TPU slice; on GPU and CPU a process, i.e. a host)
  and the DCN part across granules, so that the collectives of ICI axes never leave a granule.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = _ici_and_dcn(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  from jax.experimental import mesh_utils

  if math.prod(dcn.values()) == 1:
    shape = tuple(ici[a] for a in MESH_AXES)
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
      # A physical topology whose axes do not each match a mesh axis (expert=16 on a v5p 4x8x8
      # slice): split physical axes. The last mesh axes (expert, tensor) still get the innermost,
      # best-connected rings of chips.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(grid, MESH_AXES, axis_types=auto)

  ici_shape = tuple(ici[a] for a in MESH_AXES)
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  # A TPU slice is the ICI domain (one slice's devices may carry no slice_index at all).
  by_slice = devices[0].platform == "tpu"
  if by_slice:
    granules = len({getattr(d, "slice_index", 0) for d in devices})
  else:
    granules = len({d.process_index for d in devices})
  if granules != math.prod(dcn_shape):
    kind = "TPU slices" if by_slice else "processes (hosts)"
    raise ShardingError(
      f"config.mesh.dcn: axis sizes {dcn} multiply to {math.prod(dcn_shape)}, but the devices span "
      f"{granules} {kind}; the DCN product must equal that number"
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    ici_shape, dcn_shape, devices, process_is_granule=not by_slice, allow_split_physical_axes=True
  )
  return Mesh(grid, MESH_AXES, axis_types=auto)


def rules_table(rules: Sequence[tuple[str, str | Sequence[str] | None]]) -> dict[str, tuple[str, ...]]:
  """Config rules → {logical: mesh axes}; checks names and that no logical axis repeats."""
  table: dict[str, tuple[str, ...]] = {}
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ShardingError(f"config.mesh.rules[{i}]={rule!r}: each rule is (logical, mesh axes)")
    name, axes = rule
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if name in table:
      raise ShardingError(f"config.mesh.rules: logical axis {name!r} appears twice")
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ShardingError(f"config.mesh.rules[{i}] ({name!r}): unknown mesh axes {unknown}; known {MESH_AXES}")
    table[name] = axes
  return table


def logical_to_spec(names: Sequence[str | None], table: Rules) -> PartitionSpec:
  """Logical dimension names → PartitionSpec; a mesh axis already used is not reused."""
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ShardingError(f"logical axis {name!r} has no rule in config.mesh.rules")
    axes = tuple(a for a in table[name] if a not in used)
    used.update(axes)
    out.append(axes if len(axes) > 1 else axes[0] if axes else None)
  return PartitionSpec(*out)


def _check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    n = math.prod(mesh.shape[a] for a in axes)
    if dim % n:
      raise ShardingError(
        f"{path}: dimension of size {dim} cannot be split over mesh axes {axes} ({n} devices); "
        "change the model size, the mesh, or the rule in config.mesh.rules"
      )


def state_shardings(abstract_state: nnx.State, mesh: Mesh, table: Rules):
  """NamedShardings for every variable of an abstract NNX state, from its logical names.

  Returns a pure dict mirroring `nnx.to_pure_dict(abstract_state)`.
  """
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)

  def one(path, names, shape_dtype):
    spec = logical_to_spec(tuple(names), table)
    _check_divisible(jax.tree_util.keystr(path), shape_dtype.shape, spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree.map_with_path(one, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


# Activation constraints: active only inside `use_mesh_rules` (i.e. while tracing the train step).
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("tmlx_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, table: Rules) -> Iterator[None]:
  token = _CONTEXT.set((mesh, table))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current(what: str) -> tuple[Mesh, Rules]:
  """The (mesh, rules) set by `use_mesh_rules`; `what` names the caller in the error."""
  ctx = _CONTEXT.get()
  if ctx is None:
    raise ShardingError(f"{what} needs a mesh: call it inside tmlx.sharding.use_mesh_rules(mesh, rules)")
  return ctx


def current_or_none() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) set by `use_mesh_rules`, or None outside it."""
  return _CONTEXT.get()


def platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the current mesh's devices, else of JAX's default
  backend. A mesh of a deviceless topology (`tmlx.targets`) names its target's platform."""
  ctx = _CONTEXT.get()
  name = jax.default_backend()
  if ctx is not None and isinstance(ctx[0], Mesh):  # an AbstractMesh has no devices
    name = ctx[0].devices.flat[0].platform
  return "gpu" if name in ("cuda", "rocm") else name


def dividing_axes(mesh: Mesh, axes: Sequence[str], size: int, keep: Sequence[str] = ()) -> tuple[str, ...]:
  """`axes` of more than one device, less the last ones (those not in `keep`) until their product
  divides `size` (e.g. a micro-batch smaller than the batch axes): what can split a dimension."""
  axes = [a for a in axes if mesh.shape[a] > 1 or a in keep]
  while size % math.prod(mesh.shape[a] for a in axes):
    droppable = [a for a in axes if a not in keep]
    if not droppable:
      break
    axes.remove(droppable[-1])
  return tuple(axes)


def expert_axis(table: Rules, what: str) -> str:
  """The one mesh axis the logical 'expert' axis maps to; `what` names the caller in the error."""
  axes = table.get("expert", ())
  if len(axes) != 1:
    raise ValueError(
      f"{what} needs logical axis 'expert' mapped to exactly one mesh axis; config.mesh.rules maps it to {axes}"
    )
  return axes[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside `use_mesh_rules`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, table = ctx
  spec = logical_to_spec(names, table)
  for dim, axes in zip(x.shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if dim % math.prod(mesh.shape[a] for a in axes):
      return x  # e.g. a micro-batch smaller than the data axes: let GSPMD choose
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, table: Rules, ndim: int) -> NamedSharding:
  """Sharding of a host batch array: leading dim over the 'batch' rule, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), table))


def batch_axes_size(mesh_sizes: Mapping[str, int], table: Rules) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh_sizes[a] for a in table.get("batch", ()))


def describe(shardings, shapes) -> str:
  """A per-parameter table: path, shape, PartitionSpec."""
  rows = []
  for (path, s), shp in zip(jax.tree.leaves_with_path(shardings), jax.tree.leaves(shapes)):
    rows.append(f"{jax.tree_util.keystr(path):<60} {str(tuple(shp.shape)):<24} {s.spec}")
  return "\n".join(rows)


__all__ = [
  "MESH_AXES",
  "ShardingError",
  "batch_axes_size",
  "batch_sharding",
  "constrain",
  "current",
  "current_or_none",
  "describe",
  "dividing_axes",
  "expert_axis",
  "logical_to_spec",
  "make_mesh",
  "mesh_shape",
  "platform",
  "rules_table",
  "state_shardings",
  "use_mesh_rules",
]
