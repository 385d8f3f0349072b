"""Training through the public entry points: every preset's :tiny variant, learning, resume."""

import importlib
import json
import logging
import pathlib

import pytest

from tests.helpers import run_main
from tests.test_config import PRESETS
from tmlx import train


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_tiny_variant_trains_two_steps(preset, tmp_path):
  config = importlib.import_module(f"experiments.{preset}").get_config("tiny")
  final = train.run(config, str(tmp_path))
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    for key in (
      "loss",
      "text_loss",
      "flow_loss",
      "load_balance_loss",
      "router_z_loss",
      "grad_norm",
      "learning_rate",
      "tokens_per_s",
      "step_time_s",
      "moe_dropped_fraction",
    ):
      assert key in r and r[key] == r[key], (key, r)  # present and not NaN
  assert final["text_targets"] > 0 and final["audio_targets"] > 0
  # Per-layer MoE metrics and throughput accounting.
  layers, experts = config.model.num_layers, config.model.moe.num_experts
  load = rows[-1]["moe/expert_load"]
  assert len(load) == layers and all(len(r) == experts and abs(sum(r) - 1) < 1e-4 for r in load)
  for i in range(layers):
    for name in ("dropped_fraction", "router_entropy", "load_balance_loss", "router_z_loss", "max_load", "min_load"):
      assert f"moe/{name}/layer_{i}" in rows[-1]
  assert rows[-1]["model_tflops_per_device"] > 0 and 0 < rows[-1]["mfu"] < 1
  assert (tmp_path / "checkpoints" / "2" / "state").is_dir()
  assert json.loads((tmp_path / "config.json").read_text())["config"]["model"]["d_model"] == config.model.d_model
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tiny_learns_and_resumes(tmp_path, caplog):
  config = importlib.import_module("experiments.tiny").get_config("tiny")
  config.data.source = "synthetic"  # a signal 30 steps can learn
  config.train.num_steps = 30
  config.checkpoint.every = 15
  config.logging.every = 5
  train.run(config, str(tmp_path))
  rows = _metrics(tmp_path)
  first, last = rows[0], rows[-1]
  assert first["step"] == 5 and last["step"] == 30
  assert last["text_loss"] < 0.7 * first["text_loss"], (first["text_loss"], last["text_loss"])
  assert last["flow_loss"] < 0.9 * first["flow_loss"], (first["flow_loss"], last["flow_loss"])

  # Rerunning in the same workdir resumes from the latest checkpoint and logs which. A tight
  # expert capacity on the way makes the dropped-token warning fire.
  config.train.num_steps = 35
  config.model.moe.capacity_factor = 0.25
  with caplog.at_level(logging.INFO):
    final = train.run(config, str(tmp_path))
  messages = [r.getMessage() for r in caplog.records]
  assert any("resumed from checkpoint step 30" in m for m in messages)
  assert final["moe_dropped_fraction"] > 0.5
  assert any("MoE dropped" in m and "drop_warn_fraction" in m for m in messages)
  assert [r["step"] for r in _metrics(tmp_path)][-2:] == [30, 35]


def test_main_entry_point_trains_and_resumes(tmp_path):
  """`python -m tmlx.main` with the tiny preset's :tiny variant, then a rerun that resumes."""
  first = run_main("experiments/tiny.py:tiny", tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}" in first.stderr
  assert "initialized from scratch" in first.stderr
  second = run_main("experiments/tiny.py:tiny", tmp_path, "--config.train.num_steps=3")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint step 2" in second.stderr
  assert "step 3/3" in second.stderr
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  # It read the sample corpus through the episode pipeline, with nothing skipped.
  assert all(r["data/windows"] > 0 and r["data/skipped"] == 0 for r in rows)


def test_all_to_all_transport_trains_like_local(tmp_path):
  """Through tmlx.main on a data=2 x expert=4 mesh: all_to_all's loss curve equals local's (fp32)."""
  curves = {}
  for transport in ("local", "all_to_all"):
    workdir = tmp_path / transport
    proc = run_main(
      "experiments/tiny.py:tiny",
      workdir,
      f"--config.model.moe.transport={transport}",
      "--config.model.compute_dtype=float32",
      "--config.model.moe.capacity_factor=1.0",  # with drops, so dispatch order matters too
      "--config.train.num_steps=6",
      "--config.checkpoint.every=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves[transport] = _metrics(workdir)
  local, a2a = curves["local"], curves["all_to_all"]
  assert [r["step"] for r in local] == [r["step"] for r in a2a] == list(range(1, 7))
  assert any(r["moe_dropped_fraction"] > 0 for r in local)
  for r_local, r_a2a in zip(local, a2a):
    for key in ("loss", "text_loss", "flow_loss", "moe_dropped_fraction", "grad_norm"):
      assert r_a2a[key] == pytest.approx(r_local[key], rel=2e-5, abs=1e-6), (r_local["step"], key)
