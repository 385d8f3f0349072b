"""The pod plan of the 276B config: it fits its chips, built abstractly (eval_shape, no arrays)."""

import os
import subprocess
import sys

import pytest

from experiments import interaction_276b
from tests.helpers import ROOT
from tmlx import plan as plan_lib

POD_DEVICES = 256  # the preset's pod: data=1 x fsdp=-1 x expert=16 x tensor=4 → fsdp=4


@pytest.fixture(scope="module")
def pod_plan() -> plan_lib.PodPlan:
  return plan_lib.plan(interaction_276b.get_config(), POD_DEVICES)


def test_default_pod_mesh_fits_h100_and_v5p_with_headroom(pod_plan):
  assert pod_plan.mesh == {"data": 1, "fsdp": 4, "expert": 16, "tensor": 4}
  # 80% leaves room for gradients, activations and XLA temporaries, which the plan does not count.
  for chip, chip_bytes in (("H100", 80e9), ("TPU v5p", 95e9)):
    assert pod_plan.total_bytes < 0.8 * chip_bytes, f"{pod_plan.total_bytes / 1e9:.1f} GB per {chip}"


def test_sharded_bytes_cover_the_unsharded_state(pod_plan):
  # Sharding can only replicate, never lose, bytes.
  assert pod_plan.total_bytes * pod_plan.num_devices >= pod_plan.global_bytes
  assert pod_plan.total_bytes == sum(r.param_bytes + r.opt_bytes for r in pod_plan.rows)
  # AdamW keeps mu and nu in the parameter dtype: twice the parameter bytes, plus scalars.
  assert pod_plan.opt_bytes - 2 * pod_plan.param_bytes < 1024


def test_the_moe_stack_is_split_nearly_all_ways(pod_plan):
  rows = {r.group: r for r in pod_plan.rows}
  assert abs(sum(r.num_params for r in pod_plan.rows) - 276e9) / 276e9 < 0.01
  # The routed experts, 99% of the stack, are split over expert x fsdp x tensor = all 256 devices;
  # the shared experts and router only over fsdp (x tensor), which costs a little of the 256.
  moe = rows["blocks/moe"]
  assert moe.global_bytes / POD_DEVICES <= moe.param_bytes < moe.global_bytes / 200


def test_cli_prints_the_table():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "tmlx.plan", "--config=experiments/interaction_276b.py", f"--devices={POD_DEVICES}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "mesh data=1 x fsdp=4 x expert=16 x tensor=4 (256 devices)" in out.stdout
  for group in ("text_embed", "blocks/attn", "blocks/moe", "flow_head", "total"):
    assert any(line.startswith(group) for line in out.stdout.splitlines()), group
  assert "of one H100 80GB" in out.stdout and "of one TPU v5p 95GB" in out.stdout


def test_cli_names_a_mesh_that_does_not_divide_the_devices():
  cmd = [sys.executable, "-m", "tmlx.plan", "--config=experiments/interaction_276b.py", "--devices=100"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "100 devices cannot fill axis 'fsdp'" in out.stderr
