"""The accelerator a process runs on, found before JAX starts, and the experiment's row of
`config.mesh_rules` for it (mesh shape, DCN shape, XLA flags, remat policy, micro-batches, and
the MoE transport with its capacity factor).

XLA reads its flags when the backend is created, so the row is chosen from what the machine says
without JAX: `TMLX_ACCELERATOR` if set (an override, e.g. "h100"); "cpu" when JAX_PLATFORMS is
"cpu"; on a TPU VM, TPU_ACCELERATOR_TYPE ("v5p-256" → "tpu v5p-256"); with NVIDIA GPUs, the
first name `nvidia-smi` lists ("NVIDIA H100 80GB HBM3"); else "cpu". Rows match by
case-insensitive substrings; they are tried in the order of their names (a ConfigDict sorts its
keys) and the first match wins.

On GPU and CPU a hybrid mesh's DCN granule is a process, so `dcn` sizes assume one process per
host (all its GPUs); with one process per GPU leave `dcn` at 1: `jax.make_mesh` then orders the
devices process-major, and the outermost mesh axes still span the hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, MutableMapping
from typing import get_args

from absl import logging

from tmlx.errors import ConfigError
from tmlx.modes import MESH_AXES, MoETransport, Remat

ENV_ACCELERATOR = "TMLX_ACCELERATOR"
ROW_FIELDS = ("match", "mesh", "dcn", "xla_flags", "remat", "grad_accum_steps", "moe_transport", "moe_capacity_factor")


def detect(env: Mapping[str, str] | None = None, nvidia_smi: Callable[[], str | None] | None = None) -> str:
  """A lower-case name of this machine's accelerator (see the module docstring)."""
  env = os.environ if env is None else env
  if env.get(ENV_ACCELERATOR):
    return env[ENV_ACCELERATOR].strip().lower()
  if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return "cpu"
  if env.get("TPU_ACCELERATOR_TYPE"):
    return f"tpu {env['TPU_ACCELERATOR_TYPE'].strip().lower()}"
  gpu = (nvidia_smi or _nvidia_smi)()
  return gpu.strip().lower() if gpu else "cpu"


def _nvidia_smi() -> str | None:
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return None
  try:
    out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
  return names[0] if out.returncode == 0 and names else None


def select(rules: Mapping, accelerator: str) -> tuple[str, Mapping] | None:
  """(name, row) of the first row of `rules` (in name order) one of whose `match` substrings is in
  `accelerator`."""
  for name, row in sorted(rules.items()):
    patterns = [p.strip().lower() for p in str(row.get("match", "")).split(",") if p.strip()]
    if any(p in accelerator for p in patterns):
      return name, row
  return None


def apply(config, accelerator: str | None = None, environ: MutableMapping[str, str] | None = None) -> str | None:
  """Applies the `config.mesh_rules` row for `accelerator` (default: `detect()`) to `config` and
  to the XLA flags in `environ` (default: this process's environment, read when JAX creates its
  backend); logs the choice; returns the row's name."""
  rules = config.get("mesh_rules") or {}
  if not rules:
    return None
  check_rules(rules)
  environ = os.environ if environ is None else environ
  accelerator = detect(environ) if accelerator is None else accelerator
  chosen = select(rules, accelerator)
  if chosen is None:
    logging.info("mesh_rules: no row matches accelerator %r; the preset's mesh is used as is", accelerator)
    return None
  name, row = chosen
  for axis, size in (row.get("mesh") or {}).items():
    config.mesh[axis] = int(size)
  for axis, size in (row.get("dcn") or {}).items():
    config.mesh.dcn[axis] = int(size)
  if row.get("remat"):
    config.model.remat = row["remat"]
  if row.get("grad_accum_steps"):
    config.optimizer.grad_accum_steps = int(row["grad_accum_steps"])
  if row.get("moe_transport"):
    config.model.moe.transport = row["moe_transport"]
  if row.get("moe_capacity_factor") is not None:
    config.model.moe.capacity_factor = float(row["moe_capacity_factor"])
  flags = str(row.get("xla_flags") or "").strip()
  if flags:
    var = "LIBTPU_INIT_ARGS" if accelerator.startswith("tpu") else "XLA_FLAGS"
    environ[var] = f"{environ.get(var, '')} {flags}".strip()
  logging.info(
    "mesh_rules: row %r for accelerator %r: mesh %s, dcn %s, remat %s, %d micro-batches, MoE %s at capacity "
    "factor %s, xla flags %r",
    name,
    accelerator,
    {a: config.mesh[a] for a in ("data", "fsdp", "expert", "tensor")},
    dict(config.mesh.dcn),
    config.model.remat,
    config.optimizer.grad_accum_steps,
    config.model.moe.transport,
    config.model.moe.capacity_factor,
    flags,
  )
  return name


def check_rules(rules: Mapping) -> None:
  """Raises ConfigError naming the first malformed field of `config.mesh_rules`."""
  for name, row in rules.items():
    where = f"config.mesh_rules.{name}"
    if not hasattr(row, "items"):
      raise ConfigError(f"{where}: expected a row (a dict with fields {', '.join(ROW_FIELDS)})")
    unknown = sorted(set(row.keys()) - set(ROW_FIELDS))
    if unknown:
      raise ConfigError(f"{where}.{unknown[0]}: unknown field; a row has {', '.join(ROW_FIELDS)}")
    if not str(row.get("match", "")).strip():
      raise ConfigError(f"{where}.match: empty; give accelerator name substrings, e.g. 'h100' or 'tpu v5p'")
    for group in ("mesh", "dcn"):
      for axis, size in (row.get(group) or {}).items():
        if axis not in MESH_AXES:
          raise ConfigError(f"{where}.{group}.{axis}: not a mesh axis ({', '.join(MESH_AXES)})")
        if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
          raise ConfigError(f"{where}.{group}.{axis}={size!r}: expected an integer ≥ 1 or -1 (fill)")
    remat = row.get("remat") or ""
    if remat and remat not in get_args(Remat):
      raise ConfigError(f"{where}.remat={remat!r}: expected one of {get_args(Remat)} (or '' to keep)")
    accum = row.get("grad_accum_steps", 0)
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 0:
      raise ConfigError(f"{where}.grad_accum_steps={accum!r}: expected an integer ≥ 1 (or 0 to keep)")
    transport = row.get("moe_transport") or ""
    if transport and transport not in get_args(MoETransport):
      expected = get_args(MoETransport)
      raise ConfigError(f"{where}.moe_transport={transport!r}: expected one of {expected} (or '' to keep)")
    factor = row.get("moe_capacity_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | float)):
      raise ConfigError(f"{where}.moe_capacity_factor={factor!r}: expected a number (≤ 0: dropless), or None to keep")
