"""Hybrid (ICI x DCN) meshes and the per-accelerator rows of `config.mesh_rules`."""

import copy
import importlib

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from tmlx import sharding
from tmlx.config import ConfigError, validate
from tmlx.runtime import accelerators


def _pod():
  return importlib.import_module("experiments.interaction_276b").get_config()


def test_accelerator_detection_without_jax():
  assert accelerators.detect({"TMLX_ACCELERATOR": "H100"}, lambda: "x") == "h100"
  assert accelerators.detect({"JAX_PLATFORMS": "cpu"}, lambda: "NVIDIA H100 80GB HBM3") == "cpu"
  assert accelerators.detect({"TPU_ACCELERATOR_TYPE": "v5p-512"}, lambda: None) == "tpu v5p-512"
  assert accelerators.detect({}, lambda: "NVIDIA H200") == "nvidia h200"
  assert accelerators.detect({}, lambda: None) == "cpu"


def test_rows_are_chosen_by_substring_and_applied():
  env = {"XLA_FLAGS": "--xla_dump_to=/nowhere"}
  gpu = _pod()
  assert accelerators.apply(gpu, "nvidia h100 80gb hbm3", env) == "gpu_hopper"
  assert (gpu.mesh.expert, gpu.mesh.dcn.fsdp, gpu.model.remat, gpu.optimizer.grad_accum_steps) == (8, -1, "full", 1)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/nowhere --xla_gpu_enable_latency_hiding_scheduler=true"
  assert sharding.mesh_shape(gpu.mesh, 64) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}  # 8 nodes
  assert (gpu.model.moe.transport, gpu.model.moe.capacity_factor) == ("local", 1.25)  # the GPU row's MoE

  tpu = _pod()
  assert accelerators.apply(tpu, "tpu v5p-1024", env) == "tpu_v5p"
  assert "--xla_tpu_enable_async_collective_fusion=true" in env["LIBTPU_INIT_ARGS"]
  assert tpu.optimizer.grad_accum_steps == 2  # micro-batches for headroom (tests/test_plan_compile.py)
  assert (tpu.model.moe.transport, tpu.model.moe.capacity_factor) == ("dropless", 0.0)  # the preset's own
  assert sharding.mesh_shape(tpu.mesh, 1024) == {"data": 4, "fsdp": 4, "expert": 16, "tensor": 4}  # 4 slices

  cpu = _pod()
  assert accelerators.apply(cpu, "cpu", env) is None
  assert cpu.to_dict() == _pod().to_dict()


@pytest.mark.parametrize(
  "row, message",
  [
    (dict(match="", mesh=dict(fsdp=2)), r"mesh_rules\.bad\.match: empty"),
    (dict(match="h100", mesh=dict(fsdpp=2)), r"mesh_rules\.bad\.mesh\.fsdpp: not a mesh axis"),
    (dict(match="h100", dcn=dict(data=0)), r"mesh_rules\.bad\.dcn\.data=0"),
    (dict(match="h100", remat="some"), r"mesh_rules\.bad\.remat='some'"),
    (dict(match="h100", grad_accum_steps=-2), r"mesh_rules\.bad\.grad_accum_steps=-2: expected an integer"),
    (dict(match="h100", flags="x"), r"mesh_rules\.bad\.flags: unknown field"),
    (dict(match="h100", moe_transport="fast"), r"mesh_rules\.bad\.moe_transport='fast': expected one of"),
    (dict(match="h100", moe_capacity_factor="1.25"), r"bad\.moe_capacity_factor='1\.25': expected a number"),
  ],
)
def test_malformed_rows_name_the_field(row, message):
  c = _pod()
  c.mesh_rules.bad = row
  with pytest.raises(ConfigError, match=message):
    validate(c)


def test_mesh_sizes_with_dcn():
  c = tiny_config()
  c.mesh.update(data=1, fsdp=1, expert=-1, tensor=1)
  c.mesh.dcn.update(data=2)
  assert sharding.mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  c.mesh.update(expert=4)
  c.mesh.dcn.update(data=-1)
  assert sharding.mesh_shape(c.mesh, 16) == {"data": 4, "fsdp": 1, "expert": 4, "tensor": 1}
  c.mesh.update(expert=-1)
  with pytest.raises(sharding.ShardingError, match="only one axis size may be -1, got mesh.expert, mesh.dcn.data"):
    sharding.mesh_shape(c.mesh, 8)
  c.mesh.dcn.update(data=3)
  with pytest.raises(sharding.ShardingError, match="multiply to 3, which does not divide the 8 devices"):
    sharding.mesh_shape(c.mesh, 8)


def test_hybrid_mesh_needs_one_granule_per_dcn_slot():
  """In one process the devices form one granule: a DCN product of 2 is refused with the reason.
  (The 2-process hybrid mesh trains in tests/test_multiprocess.py.)"""
  c = tiny_config()
  c.mesh.update(data=1, expert=4)
  c.mesh.dcn.update(data=2)
  with pytest.raises(sharding.ShardingError, match="devices span 1 processes"):
    sharding.make_mesh(c.mesh)
  c.mesh.dcn.update(data=1)
  c.mesh.update(data=2)
  mesh = sharding.make_mesh(c.mesh)
  assert np.array_equal(np.vectorize(lambda d: d.id)(mesh.devices).ravel(), [d.id for d in jax.devices()])


def test_the_pod_preset_rows_are_valid():
  c = _pod()
  validate(c)
  for acc in ("tpu v5p-512", "nvidia h100 80gb hbm3", "nvidia h200"):
    d = copy.deepcopy(c)
    assert accelerators.apply(d, acc, {}) is not None
    validate(d)
