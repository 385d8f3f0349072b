"""Chips a run is planned for, as devices without the hardware: TPU slices from libtpu's topology
descriptions and GPU clusters from the CUDA plugin's, so that `tmlx.plan --compile` and the tests
build meshes and compile the real train step for a pod on a CPU machine.

A target names the accelerator string `tmlx.runtime.accelerators.detect()` would report on that hardware,
so the preset's `config.mesh_rules` row for it (mesh, DCN, XLA flags, remat) applies as it would on
the pod. HBM figures are the vendors' (decimal GB, the smaller reading; `tmlx.plan.GB`).

GPU devices need a description of the card (XLA's GpuTargetConfigProto, text form); it is written
here from the card's public figures (`_HOPPER` and `GPUS`) rather than read from a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # what --topology takes, e.g. 'v5p-512' or 'h200x256'
  platform: str  # 'tpu' or 'cuda'
  accelerator: str  # as tmlx.runtime.accelerators.detect() reports it there, e.g. 'tpu v5p-512'
  chip: str  # e.g. 'TPU v5p' or 'NVIDIA H200'
  hbm_bytes: float  # per chip
  topology: str  # libtpu's slice name ('v5p:4x8x8') or the CUDA plugin's 'slices x hosts x gpus'
  slices: int = 1  # TPU slices joined over DCN

  @property
  def num_devices(self) -> int:
    dims = [int(d) for d in self.topology.split(":")[-1].split("x")]
    chips = 1
    for d in dims:
      chips *= d
    return chips * self.slices

  def devices(self) -> list:
    """The target's devices, in the order its topology description lists them."""
    from jax.experimental import topologies

    if self.platform == "tpu":
      # A description opens no chip; without this, a second process with libtpu loaded (a
      # training job on this TPU VM, or a test) would refuse to start for libtpu's lock file.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      desc = topologies.get_topology_desc(platform="tpu", topology_name=self.topology, num_slices=self.slices)
    else:
      desc = topologies.get_topology_desc(
        topology_name="", platform="cuda", target_config=gpu_target_config(self.chip), topology=self.topology
      )
    return list(desc.devices)


# TPU slices: (chip, HBM per chip, libtpu version prefix, TPU_ACCELERATOR_TYPE prefix, cores per chip).
_TPUS = {
  "v4": ("TPU v4", 32 * GB, "v4", "v4", 2),
  "v5e": ("TPU v5e", 16 * GB, "v5e", "v5litepod", 1),
  "v5p": ("TPU v5p", 95 * GB, "v5p", "v5p", 2),
  "v6e": ("TPU v6e", 32 * GB, "v6e", "v6e", 1),
}
_TPU_SHAPES = {  # (version, chips) → slice shape
  ("v4", 256): "4x8x8",
  ("v4", 512): "8x8x8",
  ("v5e", 256): "16x16",
  ("v5p", 4): "2x2x1",
  ("v5p", 8): "2x2x2",
  ("v5p", 256): "4x8x8",
  ("v5p", 512): "8x8x8",
  ("v6e", 256): "16x16",
}

# Hopper cards: public figures (SMs, memory, bandwidth, clocks). What all Hopper parts share is
# in _HOPPER.
GPUS = {
  "NVIDIA H100": dict(
    name="NVIDIA H100 80GB HBM3", memory=84_942_979_072, bandwidth=3_352_320_000_000, mem_clock_khz=2_619_000
  ),
  "NVIDIA H200": dict(
    name="NVIDIA H200 141GB HBM3e", memory=151_397_597_184, bandwidth=4_800_000_000_000, mem_clock_khz=3_750_000
  ),
}
_HOPPER = dict(
  threads_per_block_limit=1024,
  threads_per_warp=32,
  shared_memory_per_block=48 * 1024,
  shared_memory_per_core=228 * 1024,
  shared_memory_per_block_optin=227 * 1024,
  threads_per_core_limit=2048,
  core_count=132,
  fpus_per_core=128,
  block_dim_limit_x=2**31 - 1,
  block_dim_limit_y=65535,
  block_dim_limit_z=65535,
  l2_cache_size=50 * 1024 * 1024,
  clock_rate_ghz=1.98,
  registers_per_core_limit=65536,
  registers_per_block_limit=65536,
)
GPUS_PER_HOST = 8


def gpu_target_config(chip: str) -> str:
  """XLA's GpuTargetConfigProto (text form) for a Hopper card of GPUS."""
  if chip not in GPUS:
    raise ValueError(f"no target description for {chip!r}; known: {', '.join(GPUS)}")
  card = GPUS[chip]
  fields = dict(_HOPPER, memory_bandwidth=card["bandwidth"], device_memory_size=card["memory"])
  body = "\n".join(f"  {k}: {v}" for k, v in fields.items())
  model = (
    f"sm_9.0a with {card['memory']}B RAM, {_HOPPER['core_count']} cores, "
    f"{int(_HOPPER['clock_rate_ghz'] * 1e6)}KHz clock, {card['mem_clock_khz']}KHz mem clock, "
    f"{_HOPPER['l2_cache_size']}B L2$"
  )
  return (
    "gpu_device_info {\n"
    f"{body}\n"
    "  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }\n"
    '  device_vendor: "NVIDIA Corporation"\n'
    '  platform_version: "Compute Capability 9.0a"\n'
    f'  model_str: "{model}"\n'
    f'  name: "{card["name"]}"\n'
    "}\n"
    'platform_name: "CUDA"\n'
    "dnn_version_info { major: 9 minor: 10 }\n"
    f'device_description_str: "{card["name"]}"\n'
  )


KNOWN = ("v4-512", "v5e-256", "v5p-16", "v5p-512", "v5p-1024", "2xv5p-512", "v6e-256", "h100x256", "h200x256")


def target(name: str) -> Target:
  """A target by name: TPU slices as Cloud TPU names them ('v5p-512': 512 cores = 256 chips,
  'v5e-256': 256 chips), 'Nx' for N slices over DCN ('2xv5p-512'); GPU clusters as card x GPUs
  ('h200x256': 32 hosts of 8)."""
  m = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)", name)
  if m:
    slices, version, count = int(m.group(1) or 1), m.group(2), int(m.group(3))
    chip, hbm, prefix, accel, cores = _TPUS[version]
    chips = count // cores
    shape = _TPU_SHAPES.get((version, chips))
    if shape is None or count % cores:
      known = ", ".join(f"{v}-{n * _TPUS[v][4]}" for v, n in sorted(_TPU_SHAPES))
      raise ValueError(f"--topology={name}: no slice shape known for it; known slices: {known}")
    return Target(name, "tpu", f"tpu {accel}-{count}", chip, hbm, f"{prefix}:{shape}", slices)
  m = re.fullmatch(r"(h100|h200)x(\d+)", name)
  if m:
    chip = f"NVIDIA {m.group(1).upper()}"
    n = int(m.group(2))
    if n % GPUS_PER_HOST:
      raise ValueError(f"--topology={name}: GPU count must be a multiple of {GPUS_PER_HOST} (hosts of 8)")
    hbm = {"NVIDIA H100": 80 * GB, "NVIDIA H200": 141 * GB}[chip]
    accelerator = GPUS[chip]["name"].lower()
    return Target(name, "cuda", accelerator, chip, hbm, f"1x{n // GPUS_PER_HOST}x{GPUS_PER_HOST}")
  raise ValueError(f"--topology={name}: unknown; expected e.g. {', '.join(KNOWN)}")


__all__ = ["GPUS", "KNOWN", "Target", "gpu_target_config", "target"]
