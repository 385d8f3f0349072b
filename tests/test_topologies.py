"""Meshes on physical chip topologies, built on CPU from libtpu's and the CUDA plugin's topology
descriptions (`tmlx.targets`): every mesh of the presets and their mesh rules builds on its target
chips; on TPU the tensor axis lies along neighbouring chips (one physical ring) while expert and
fsdp take the rest, and on GPU clusters the expert axis stays inside one host's NVLink domain."""

import importlib

import numpy as np
import pytest

from tmlx import sharding, targets

# (preset, topology): the mesh-rules row for the topology's accelerator applies, as on the pod.
TPU_TARGETS = [
  ("interaction_276b", "v5p-512"),
  ("interaction_276b", "2xv5p-512"),  # two slices over DCN: data parallel across them
]
# The tpu_v5p row is for slices of 256 chips (one model replica per slice); a larger single slice
# is refused in one line (test_a_mesh_rule_for_other_slices_is_refused_in_one_line).
GPU_TARGETS = [("interaction_276b", "h100x256"), ("interaction_276b", "h200x256")]


def _mesh(preset: str, topology: str):
  from tmlx import plan

  config = importlib.import_module(f"experiments.{preset}").get_config()
  target = targets.target(topology)
  plan.for_target(config, target, environ={})
  devices = target.devices()
  assert len(devices) == target.num_devices
  mesh = sharding.make_mesh(config.mesh, devices)
  assert mesh.devices.size == len(devices) and len({d.id for d in mesh.devices.flat}) == len(devices)
  return mesh


def test_the_preset_mesh_builds_on_v5p_512_without_its_mesh_rule():
  # The preset's own mesh (data 1, fsdp -1, expert 16, tensor 4) on a 4x8x8 slice: expert=16
  # matches no physical axis, so it is split over two.
  config = importlib.import_module("experiments.interaction_276b").get_config()
  mesh = sharding.make_mesh(config.mesh, targets.target("v5p-512").devices())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 16, "tensor": 4}


@pytest.mark.parametrize("preset, topology", TPU_TARGETS)
def test_preset_meshes_build_on_their_tpu_slices(preset, topology):
  mesh = _mesh(preset, topology)
  sizes = dict(mesh.shape)
  assert sizes["tensor"] == 4 and sizes["expert"] == 16, sizes
  slices = {getattr(d, "slice_index", 0) for d in mesh.devices.flat}
  if len(slices) > 1:  # each model replica (fsdp x expert x tensor) lives in one slice
    assert sizes["data"] == len(slices)
    for replica in mesh.devices:
      assert len({getattr(d, "slice_index", 0) for d in replica.flat}) == 1
  # Each tensor group: chips that differ in one physical coordinate, in consecutive positions.
  grid = mesh.devices.reshape(-1, sizes["tensor"])
  for group in grid:
    coords = np.array([d.coords for d in group])
    moving = np.flatnonzero((coords != coords[0]).any(axis=0))
    assert len(moving) == 1, coords
    assert sorted(coords[:, moving[0]]) == list(range(coords[:, moving[0]].min(), coords[:, moving[0]].max() + 1))


@pytest.mark.parametrize("preset, topology", GPU_TARGETS)
def test_preset_meshes_build_on_their_gpu_clusters(preset, topology):
  mesh = _mesh(preset, topology)
  sizes = dict(mesh.shape)
  assert sizes["expert"] == 8 and sizes["fsdp"] == mesh.devices.size // 8, sizes
  # Expert groups (the all-to-all of every MoE layer) are the 8 GPUs of one host.
  axes = list(mesh.axis_names)
  groups = np.moveaxis(mesh.devices, axes.index("expert"), -1).reshape(-1, sizes["expert"])
  for group in groups:
    assert len({d.process_index for d in group}) == 1, [d.process_index for d in group]


def test_a_mesh_rule_for_other_slices_is_refused_in_one_line():
  with pytest.raises(sharding.ShardingError, match=r"multiply to 2, but the devices span 1 TPU slices"):
    _mesh("interaction_276b", "v5p-1024")


def test_unknown_topologies_are_refused_in_one_line():
  with pytest.raises(ValueError, match=r"--topology=v5p-7: no slice shape known"):
    targets.target("v5p-7")
  with pytest.raises(ValueError, match=r"--topology=tpu9: unknown; expected e.g. v4-512"):
    targets.target("tpu9")
