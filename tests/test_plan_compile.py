"""The 276B train step compiled for its real target chips on this CPU machine (`python -m tmlx.plan
--compile`): it fits one chip with headroom, the partitioner finds nothing it could only do by
replicating, and its memory figures match the golden files (a change that grows memory shows in
review). The depth is reduced to 2 scanned layers: compile time does not grow with depth, per-chip
memory does (the full preset's figures are in BUILD.md, "Pod plan").

Regenerate the golden figures after an intended change:
  TMLX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_plan_compile.py
"""

import json
import os
import pickle
import subprocess
import sys

import pytest

from tests.helpers import ROOT

GOLDEN = ROOT / "tests" / "golden" / "compiled"
UPDATE = os.environ.get("TMLX_UPDATE_GOLDEN") == "1"
LAYERS = 2


def _plan(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  # The compile itself is under test (its time is reported): no persistent cache (tests/conftest.py).
  drop = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_COMPILATION_CACHE_DIR")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  cmd = [sys.executable, "-m", "tmlx.plan", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("topology", ["v5p-512", "h200x256"])
def test_the_276b_step_compiles_for_its_target_and_fits_with_headroom(tmp_path, topology):
  out = tmp_path / "figures.json"
  proc = _plan(
    "--config=experiments/interaction_276b.py",
    f"--config.model.num_layers={LAYERS}",
    "--compile",
    f"--topology={topology}",
    f"--json={out}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = json.loads(out.read_text())
  assert "compiled train step for" in proc.stdout and "findings: none" in proc.stdout, proc.stdout
  assert figures["findings"] == [], figures["findings"]
  assert 0 < figures["peak_bytes"] <= 0.8 * figures["hbm_bytes"], figures
  assert figures["alias_bytes"] > 0.9 * figures["output_bytes"], "the train state is donated: outputs reuse it"
  # Splash attention and dropless experts on TPU; the Pallas flash kernel and capacity buffers on
  # GPU (the preset's gpu_hopper row: XLA:GPU's ragged_dot would not fit).
  tpu = topology.startswith("v5p")
  ops = figures["ops"]
  assert ops.get("pallas_tpu" if tpu else "pallas_gpu") and bool(ops.get("ragged_all_to_all")) == tpu, ops

  golden = GOLDEN / f"interaction_276b.{LAYERS}layers.{topology}.json"
  current = json.dumps({k: figures[k] for k in GOLDEN_KEYS}, indent=1) + "\n"
  if UPDATE:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    golden.write_text(current)
  stored = golden.read_text() if golden.exists() else None
  assert stored == current, (
    f"{golden.relative_to(ROOT)} differs from this compile (stored, then now):\n{stored}\n{current}\n"
    "If the change is intended, regenerate it: TMLX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q "
    "tests/test_plan_compile.py"
  )


GOLDEN_KEYS = (
  "target",
  "mesh",
  "num_layers",
  "argument_bytes",
  "output_bytes",
  "alias_bytes",
  "temp_bytes",
  "peak_bytes",
)


@pytest.mark.parametrize("topology, kernel", [("v5p-16", "pallas_tpu"), ("h200x8", "pallas_gpu")])
def test_the_tiny_step_compiles_with_the_accelerator_kernels_and_the_dropless_exchange(tmp_path, topology, kernel):
  """The :tiny variant (seconds to compile) takes the same paths as the full preset on its target:
  attention 'auto' resolves to the target's kernel by the mesh's devices, and the dropless MoE
  exchanges with ragged_all_to_all (which XLA:CPU lacks) instead of its CPU emulation."""
  out = tmp_path / "figures.json"
  args = ("--config=experiments/interaction_276b.py:tiny", "--compile", f"--topology={topology}", f"--json={out}")
  proc = _plan(*args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ops = json.loads(out.read_text())["ops"]
  assert ops.get(kernel) and ops.get("ragged_all_to_all"), ops
  assert "kernels and exchanges: " in proc.stdout and "ragged_all_to_all" in proc.stdout, proc.stdout


def test_a_step_without_headroom_fails_in_one_line_and_the_executable_is_saved(tmp_path):
  # The tiny variant on a 2x2x2 v5p slice compiles in seconds; no step fits in 1e-9 of a chip.
  exe = tmp_path / "step.pkl"
  proc = _plan(
    "--config=experiments/interaction_276b.py:tiny",
    "--compile",
    "--topology=v5p-16",
    "--max_hbm_fraction=1e-9",
    f"--save_executable={exe}",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("does not fit with headroom: peak ") and "above --max_hbm_fraction=1e-09" in last, last
  with open(exe, "rb") as f:
    payload, in_tree, out_tree = pickle.load(f)  # what serialize_executable.deserialize_and_load takes
  assert isinstance(payload, bytes) and len(payload) > 1000


def test_the_plan_for_a_topology_applies_its_mesh_rule():
  proc = _plan("--config=experiments/interaction_276b.py", "--topology=h200x256", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("mesh data=1 x fsdp=32 x expert=8 x tensor=1 (256 devices)"), proc.stdout[:300]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--compile"], "invalid flags: --compile needs --topology (e.g. --topology=v5p-512)"),
    (["--compile", "--topology=v5p-7"], "invalid flags: --topology=v5p-7: no slice shape known for it"),
    (["--topology=h200x12"], "invalid flags: --topology=h200x12: GPU count must be a multiple of 8"),
  ],
)
def test_bad_plan_flags_are_refused_in_one_line(args, message):
  proc = _plan("--config=experiments/interaction_276b.py", *args, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-1000:]
