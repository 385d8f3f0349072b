"""Training through the public entry points: every preset's :tiny variant, learning, resume."""

import functools
import importlib
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.contract import Kind
from tests.helpers import run_main, synthetic_batch
from tests.test_config import PRESETS
from tmlx import faults, sharding, train
from tmlx.checkpoint import Checkpointer
from tmlx.state import state_spec


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_tiny_variant_trains_two_steps(preset, tmp_path):
  config = importlib.import_module(f"experiments.{preset}").get_config("tiny")
  # Presets with held-out conversations evaluate on them at the last step, in that step's row.
  config.eval.every = 2 if config.eval.data else 0
  final = train.run(config, str(tmp_path))
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  duplex = [r for r in rows if "duplex/takeover_rate" in r]
  assert [r["step"] for r in duplex] == ([2] if config.eval.data else [])
  for r in duplex:
    assert 0 <= r["duplex/takeover_rate"] <= 1 and r["duplex/mel_error_vs_mean"] > 0
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
  config = importlib.import_module("experiments.sample_cpu").get_config("tiny")
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
  """`python -m tmlx.main` with the sample_cpu preset's :tiny variant, then a rerun that resumes."""
  first = run_main("experiments/sample_cpu.py:tiny", tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}" in first.stderr
  assert "initialized from scratch" in first.stderr
  second = run_main("experiments/sample_cpu.py:tiny", tmp_path, "--config.train.num_steps=3")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint step 2" in second.stderr
  assert "step 3/3" in second.stderr
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  # It read the sample corpus through the episode pipeline, with nothing skipped.
  assert all(r["data/windows"] > 0 and r["data/skipped"] == 0 for r in rows)


@pytest.mark.parametrize(
  "field, reference, candidate, capacity",
  [
    ("model.moe.transport", "local", "all_to_all", "1.0"),  # with drops, so dispatch order matters too
    ("model.moe.transport", "local", "dropless", "0"),
    ("model.attention_impl", "dense", "blockwise", "1.0"),
    ("model.attention_impl", "dense", "splash", "1.0"),  # Pallas interpret mode on CPU
  ],
)
def test_an_implementation_trains_like_its_reference(tmp_path, field, reference, candidate, capacity):
  """Through tmlx.main on a data=2 x expert=4 mesh, fp32: the candidate's loss curve equals the
  reference's (the attention rows have a window and packed segments)."""
  curves = {}
  for value in (reference, candidate):
    workdir = tmp_path / value
    proc = run_main(
      "experiments/sample_cpu.py:tiny",
      workdir,
      f"--config.{field}={value}",
      "--config.model.compute_dtype=float32",
      f"--config.model.moe.capacity_factor={capacity}",
      "--config.model.attention_block=128",
      "--config.train.num_steps=6",
      "--config.checkpoint.every=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves[value] = _metrics(workdir)
  ref, got = curves[reference], curves[candidate]
  assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, 7))
  assert any(r["moe_dropped_fraction"] > 0 for r in ref) == (capacity != "0")
  for r_ref, r_got in zip(ref, got):
    for key in ("loss", "text_loss", "flow_loss", "moe_dropped_fraction", "grad_norm"):
      assert r_got[key] == pytest.approx(r_ref[key], rel=2e-5, abs=1e-6), (r_ref["step"], key)


def test_non_finite_loss_skips_the_update_and_too_many_stop_the_run(tmp_path, caplog):
  """A NaN injected into the loss of step 3 (`train.inject_nan_at_steps`) leaves params, optimizer
  and router state bitwise unchanged, and the loop logs and counts it; a corrupt flow target does
  the same; past `max_consecutive_bad_steps` the run saves and stops."""
  config = importlib.import_module("experiments.sample_cpu").get_config("tiny")
  config.data.source = "synthetic"
  config.model.moe.bias_update_rate = 0.01
  config.train.num_steps = 4
  config.train.inject_nan_at_steps = "3"
  config.checkpoint.every = 1
  config.checkpoint.async_save = False
  config.logging.tensorboard = False
  with caplog.at_level(logging.WARNING):
    train.run(config, str(tmp_path / "drill"))
  assert any(
    "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in r.getMessage()
    for r in caplog.records
  )
  rows = {r["step"]: r for r in _metrics(tmp_path / "drill")}
  assert [rows[s]["bad_step"] for s in (1, 2, 3, 4)] == [0, 0, 1, 0]
  assert [rows[s]["bad_steps"] for s in (2, 4)] == [0, 1]  # step 3's flag is read after step 4 starts
  assert not np.isfinite(rows[3]["loss"]) and np.isfinite(rows[4]["loss"])
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), spec.abstract, spec.shardings)
  ckpt = Checkpointer(str(tmp_path / "drill" / "checkpoints"), keep=10, async_save=False)
  saved = {step: jax.device_get(ckpt.restore(step, target)) for step in (2, 3, 4)}
  ckpt.close()
  assert [int(saved[s].step) for s in (2, 3, 4)] == [2, 3, 4]
  same = lambda a, b: all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b))
  for name in ("params", "model_state", "opt_state"):
    leaves = {s: jax.tree.leaves(getattr(saved[s], name)) for s in (2, 3, 4)}
    assert same(leaves[2], leaves[3]), f"{name} changed in the skipped step"
    assert not same(leaves[3], leaves[4]), f"{name} did not change in the step after"

  # A NaN in the data (a corrupt flow target) is caught the same way.
  config.train.inject_nan_at_steps = ""
  step_fn = jax.jit(functools.partial(train.train_step, sc=train.step_config(config, spec, mesh, rules)))
  state = jax.device_put(saved[4], spec.shardings)
  batch = synthetic_batch(config)
  before = jax.device_get(state)
  mel = np.asarray(batch["mel"]).copy()
  mel[np.asarray(batch["kind"]) == Kind.AUDIO_OUT] = np.nan
  bad, m = step_fn(state, {**batch, "mel": jnp.asarray(mel)})
  assert not np.isfinite(float(m["loss"])) and float(m["bad_step"]) == 1 and int(bad.step) == 5
  after = jax.device_get(bad)
  for name in ("params", "model_state", "opt_state"):
    assert same(jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))), name

  # In the loop: a learning rate that blows the parameters up makes every step after the first
  # non-finite; the run saves and stops with an error naming the field.
  config.optimizer.learning_rate = 1e30
  config.optimizer.warmup_steps = 0
  config.optimizer.clip_norm = 0.0
  config.train.num_steps = 20
  config.train.max_consecutive_bad_steps = 2
  config.checkpoint.every = 0
  with pytest.raises(faults.BadStepsError, match="max_consecutive_bad_steps=2"):
    train.run(config, str(tmp_path))
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and 3 <= saved[-1] <= 6
