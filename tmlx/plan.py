"""Pod plan: per-device memory of a config on the chips it is meant for, without the chips.

`python -m tmlx.plan --config=experiments/interaction_276b.py --devices=256` counts what
lives on a device between steps: parameters, optimizer state and the step counter. The mesh is an
AbstractMesh (axis names and sizes only) and the train state comes from `jax.eval_shape`, so this
runs on a laptop for any pod size. Gradients, activations and XLA temporaries come on top.

`python -m tmlx.plan --config=... --compile --topology=v5p-512` compiles the real train step for
the target (`tmlx.targets`: TPU slices from libtpu's topology descriptions, GPU clusters from the
CUDA plugin's) and reports what XLA's memory analysis says of one chip: arguments, outputs,
temporaries and the peak against the chip's HBM, the compile time, XLA's FLOPs beside
`tmlx.flops`, and partitioner warnings that mean wasted memory or bandwidth (findings). It exits
non-zero when the step does not fit, or fits with less headroom than --max_hbm_fraction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import ml_collections
import optax
from jax.sharding import PartitionSpec

from tmlx import config as config_lib
from tmlx import flops, sharding, targets
from tmlx.state import StateSpec, state_spec

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


def _state_spec(config: ml_collections.ConfigDict, mesh) -> StateSpec:
  return state_spec(config, mesh, sharding.rules_table(config.mesh.rules))


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


# --- Compiling the step for a target without the hardware (--compile) -------------------------

# Partitioner and compiler warnings that mean the program moves or recomputes far more than it
# should: printed as findings and checked by tests (a preset should have none).
FINDING_PATTERNS = ("Involuntary full rematerialization",)


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
  """Per-chip memory of the compiled train step on a target, from XLA's memory analysis."""

  target: str
  chip: str
  mesh: dict[str, int]
  num_layers: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written in place of donated arguments (the train state)
  temp_bytes: int
  peak_bytes: int  # XLA's peak where it reports one, else argument + output - alias + temp
  peak_source: str  # 'xla' or 'sum'
  hbm_bytes: float
  compile_s: float
  xla_flops: float | None  # XLA's cost analysis of the step, per chip (None where not given)
  model_flops: float  # tmlx.flops of one step, per chip
  findings: tuple[str, ...]
  ops: dict[str, int]  # instructions of the compiled program by kind (`OPS`), those present

  @property
  def fraction(self) -> float:
    return self.peak_bytes / self.hbm_bytes

  def golden(self) -> dict:
    """What the golden files hold: the memory figures (bytes), exact for pinned compilers."""
    keys = ("target", "mesh", "num_layers", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
    return {k: getattr(self, k) for k in (*keys, "peak_bytes")}


class _CapturedStderr:
  """Copies what C++ code writes to file descriptor 2 (XLA's warnings) while it is entered, and
  writes it through afterwards."""

  def __enter__(self):
    import tempfile

    sys.stderr.flush()
    self._file = tempfile.TemporaryFile(mode="w+b")
    self._saved = os.dup(2)
    os.dup2(self._file.fileno(), 2)
    return self

  def __exit__(self, *exc):
    sys.stderr.flush()
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._file.seek(0)
    self.text = self._file.read().decode(errors="replace")
    self._file.close()
    sys.stderr.write(self.text)
    return False


# What the compiled program's text is searched for, to show which kernels and exchanges it runs.
OPS = {
  "pallas_tpu": 'custom_call_target="tpu_custom_call"',  # splash attention, megablox
  "pallas_gpu": 'custom_call_target="__gpu$xla.gpu.triton"',
  "cudnn_attention": 'custom_call_target="__cudnn$fmha',
  "ragged_all_to_all": re.compile(r" ragged-all-to-all(-start)?\("),
  "all_to_all": re.compile(r" all-to-all(-start)?\("),
}


def _ops(text: str) -> dict[str, int]:
  counts = {k: len(p.findall(text)) if isinstance(p, re.Pattern) else text.count(p) for k, p in OPS.items()}
  return {k: n for k, n in counts.items() if n}


def _findings(log: str) -> tuple[str, ...]:
  lines = [line.strip() for line in log.splitlines() if any(p in line for p in FINDING_PATTERNS)]
  # The same warning repeats per layer or per collective; keep one of each text.
  return tuple(dict.fromkeys(re.sub(r"^\S+ \S+\s+\d+ \S+:\d+\] ", "", line) for line in lines))


def compile_step(
  config: ml_collections.ConfigDict, target: targets.Target, devices=None, save_executable: str | None = None
) -> CompiledPlan:
  """Compiles the train step of `config` (its mesh rules for `target` already applied, see
  `for_target`) for `target`'s devices and reads back what XLA says of its memory.

  Raises DoesNotFit when the compiler runs out of the chip's memory. With `save_executable`, writes
  the serialized executable there (loadable with `jax.experimental.serialize_executable`
  `deserialize_and_load` on the target's devices)."""
  devices = target.devices() if devices is None else devices
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_table(config.mesh.rules)
  spec = _state_spec(config, mesh)
  from tmlx import train  # only to compile: the table needs no trainer

  step_fn, _, abstract_batch = train.jit_train_step(config, spec, mesh, rules)
  t0 = time.perf_counter()
  with _CapturedStderr() as log:
    try:
      compiled = step_fn.lower(spec.abstract, abstract_batch).compile()
    except Exception as e:  # XLA raises its own runtime error type
      if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        raise DoesNotFit(f"{target.name}: the train step does not fit one {target.chip}: {_first_line(e)}") from e
      raise
  compile_s = time.perf_counter() - t0
  if save_executable:
    import pickle

    from jax.experimental import serialize_executable

    with open(save_executable, "wb") as f:
      pickle.dump(serialize_executable.serialize(compiled), f)
  mem = compiled.memory_analysis()
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
  summed = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else None
  tokens = config.data.global_batch_size * config.data.seq_len
  return CompiledPlan(
    target=target.name,
    chip=target.chip,
    mesh=dict(mesh.shape),
    num_layers=config.model.num_layers,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    peak_bytes=peak or int(summed),
    peak_source="xla" if peak else "sum",
    hbm_bytes=target.hbm_bytes,
    compile_s=compile_s,
    xla_flops=float(cost["flops"]) if cost and "flops" in cost else None,
    model_flops=flops.flops_per_token(config) * tokens / len(devices),
    findings=_findings(log.text),
    ops=_ops(compiled.as_text()),
  )


class DoesNotFit(RuntimeError):
  pass


def _first_line(e: BaseException) -> str:
  return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def for_target(config: ml_collections.ConfigDict, target: targets.Target, environ: dict) -> str | None:
  """Applies the preset's mesh-rules row for `target` to `config` and its XLA flags to `environ`
  (LIBTPU_INIT_ARGS or XLA_FLAGS, read when the target's compiler starts); returns the row."""
  from tmlx.runtime import accelerators

  return accelerators.apply(config, accelerator=target.accelerator, environ=environ)


def format_compiled(c: CompiledPlan) -> str:
  mesh = " x ".join(f"{a}={n}" for a, n in c.mesh.items())
  gib = 2**30
  lines = [
    f"compiled train step for {c.target} ({c.chip}), mesh {mesh}, {c.num_layers} layers, in {c.compile_s:.0f}s",
    f"per chip: arguments {c.argument_bytes / gib:.2f} GiB, outputs {c.output_bytes / gib:.2f} GiB "
    f"(aliased {c.alias_bytes / gib:.2f} GiB), temporaries {c.temp_bytes / gib:.2f} GiB",
    f"peak {c.peak_bytes / gib:.2f} GiB{'' if c.peak_source == 'xla' else ' (arguments + outputs - aliased + temps)'}"
    f" = {c.fraction:.1%} of the {c.hbm_bytes / GB:.0f} GB of one {c.chip}",
    f"FLOPs per chip per step: model (tmlx.flops) {c.model_flops:.4g}, XLA cost analysis "
    + (
      "not given for this platform"
      if c.xla_flops is None
      else f"{c.xla_flops:.4g} ({c.xla_flops / c.model_flops:.2f}x)"
    ),
  ]
  if c.xla_flops is not None and c.num_layers > 1:
    # XLA's cost analysis counts the body of a while loop (the scanned layers) once.
    lines.append("  (XLA counts the scanned layers once: compare the two at --config.model.num_layers=1)")
  lines.append("kernels and exchanges: " + (", ".join(f"{k} {n}" for k, n in c.ops.items()) or "none"))
  if c.findings:
    lines.append(f"findings ({len(c.findings)}): the partitioner could not shard these efficiently")
    lines += [f"  {f}" for f in c.findings]
  else:
    lines.append("findings: none")
  return "\n".join(lines)


def _cli() -> None:
  # Flags are defined only when run as a program: importing `plan` next to tmlx.main (tests do)
  # must not register a second --config.
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/interaction_276b.py.", lock_config=True
  )
  devices = flags.DEFINE_integer("devices", 256, "Devices in the pod; fills the mesh axis that is -1.")
  topology = flags.DEFINE_string(
    "topology",
    None,
    f"Target chips ({', '.join(targets.KNOWN)}, ...): the preset's mesh-rules row for them applies and "
    "--devices is theirs.",
  )
  compile_ = flags.DEFINE_bool(
    "compile", False, "Compile the train step for --topology (no hardware needed) and report its memory."
  )
  max_fraction = flags.DEFINE_float(
    "max_hbm_fraction", 0.8, "With --compile: fail when the peak exceeds this fraction of one chip's HBM."
  )
  save_executable = flags.DEFINE_string("save_executable", None, "With --compile: write the serialized executable.")
  json_out = flags.DEFINE_string("json", None, "With --compile: write the figures as JSON to this file.")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Shapes and shardings only: never open an accelerator (on a TPU VM that would also take the
    # chips from a training job running there). Topology descriptions open none either.
    jax.config.update("jax_platforms", "cpu")
    if compile_.value and not topology.value:
      sys.exit("invalid flags: --compile needs --topology (e.g. --topology=v5p-512)")
    try:
      target = targets.target(topology.value) if topology.value else None
      if target is not None:
        for_target(config.value, target, os.environ)  # XLA flags before the target's compiler starts
      if not compile_.value:
        print(format_plan(plan(config.value, target.num_devices if target else devices.value)))
        return
      result = compile_step(config.value, target, save_executable=save_executable.value)
    except ValueError as e:  # ConfigError and ShardingError are ValueErrors; so are unknown topologies
      sys.exit(f"invalid config: {e}" if not str(e).startswith("--") else f"invalid flags: {e}")
    except DoesNotFit as e:
      sys.exit(f"does not fit: {e}")
    print(format_compiled(result))
    if json_out.value:
      with open(json_out.value, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    if result.fraction > max_fraction.value:
      sys.exit(
        f"does not fit with headroom: peak {result.peak_bytes / 2**30:.2f} GiB is {result.fraction:.1%} of one "
        f"{result.chip}'s HBM, above --max_hbm_fraction={max_fraction.value}"
      )

  app.run(main)


if __name__ == "__main__":
  _cli()


__all__ = [
  "CHIPS",
  "CompiledPlan",
  "DoesNotFit",
  "PlanRow",
  "PodPlan",
  "VariableLayout",
  "abstract_mesh",
  "compile_step",
  "for_target",
  "format_compiled",
  "format_plan",
  "plan",
  "variable_layouts",
]
