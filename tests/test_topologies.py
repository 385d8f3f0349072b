"""Meshes on physical chip topologies, built on CPU from libtpu's topology descriptions: every
TPU mesh of the presets and their mesh rules builds on its target slice, and the tensor axis lies
along neighbouring chips (one physical ring) while expert and fsdp take the rest."""

import importlib

import numpy as np
import pytest
from jax.experimental import topologies

from tmlx import sharding

# (preset, mesh rule or None for the preset's own mesh, topology name, slices)
TARGETS = [
  ("tml_interaction_small", None, "v5:4x8x8", 1),  # v5p-512
  ("tml_interaction_small", "tpu_v5p", "v5:4x8x8", 1),
  ("tml_interaction_small", "tpu_v5p", "v5:8x8x4", 1),
  ("tml_interaction_small", "tpu_v5p", "v5:4x4x16", 1),
]


def _devices(topology: str, slices: int):
  return topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices).devices


@pytest.mark.parametrize("preset, rule, topology, slices", TARGETS)
def test_preset_meshes_build_on_their_tpu_slices(preset, rule, topology, slices):
  config = importlib.import_module(f"experiments.{preset}").get_config()
  if rule is not None:
    config.mesh.update(config.mesh_rules[rule].mesh)
  devices = _devices(topology, slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  assert mesh.devices.size == len(devices) and len({d.id for d in mesh.devices.flat}) == len(devices)
  sizes = dict(mesh.shape)
  assert sizes["tensor"] == 4 and sizes["expert"] == 16, sizes
  # Each tensor group: chips that differ in one physical coordinate, in consecutive positions.
  grid = mesh.devices.reshape(-1, sizes["tensor"])
  for group in grid:
    coords = np.array([d.coords for d in group])
    moving = np.flatnonzero((coords != coords[0]).any(axis=0))
    assert len(moving) == 1, coords
    assert sorted(coords[:, moving[0]]) == list(range(coords[:, moving[0]].min(), coords[:, moving[0]].max() + 1))
