"""Checkpoints: fingerprints, retention, fallback past a corrupted step, params-only restores and
the inspect command. Restores on other meshes of a 2-process save: tests/test_faults.py."""

import importlib
import json
import logging
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.helpers import ROOT
from tmlx import sharding, train
from tmlx.checkpoint import Checkpointer, CheckpointError, fingerprints, fingerprints_async, grown_axis, leaf_name
from tmlx.state import state_spec


def _config(**mesh):
  c = importlib.import_module("experiments.sample_cpu").get_config("tiny")
  c.data.source = "synthetic"
  c.model.compute_dtype = "float32"
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_fingerprints_do_not_depend_on_the_mesh_and_see_every_element():
  x = jax.random.normal(jax.random.key(0), (64, 48))
  tree = {"a": x, "b": x.astype(jnp.bfloat16), "c": jnp.arange(10, dtype=jnp.int32), "d": jnp.float32(3.0)}
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, PartitionSpec(*spec)))
  y = jax.random.randint(jax.random.key(1), (4, 6, 12), -(2**31), 2**31 - 1, jnp.int32)
  sharded = [
    dict(tree, a=put(x, "x", "y")),
    dict(tree, a=put(x, "y", "x"), b=put(tree["b"], None, "x")),  # b: replicated over y
    dict(tree, a=put(x, None, ("x", "y")), c=put(tree["c"], None)),
  ]
  reference = fingerprints(tree)
  for t in sharded:
    assert fingerprints(t) == reference
  # The host path (CPU arrays) and the device path (accelerators) compute the same numbers.
  for t in (tree, sharded[0], {"y": put(y, "y", None, "x"), "m": put(y > 0, None, "y"), "h": y.astype(jnp.uint16)}):
    assert fingerprints(t, on_host=True) == fingerprints(t, on_host=False)
    for on_host in (True, False):  # what a save uses: finished in the background
      assert fingerprints_async(t, on_host=on_host).result(timeout=60) == fingerprints(t)
  for changed in (x.at[17, 5].add(1e-6), x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])):  # a value; a swap
    assert fingerprints(dict(tree, a=changed))["a"] != reference["a"]
    assert fingerprints(dict(tree, a=put(changed, "x", "y")))["a"] != reference["a"]


def test_retention_keeps_the_latest_and_every_kth(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    ckpt.save(step, {"w": jnp.full((3,), step, jnp.float32)}, {"x": 1})
  ckpt.close()
  assert Checkpointer(str(tmp_path), keep=2, keep_every=4, async_save=False).all_steps() == [4, 8, 9, 10]


def test_a_save_of_small_replicated_arrays_compiles_nothing(tmp_path):
  """Orbax's default cuts every replicated array into one slice per replica, a device program
  compiled per shape (about 12 s in the first save of a tiny run); small arrays are written whole."""
  mesh = jax.make_mesh((8,), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  state = {f"a{n}": jax.device_put(jnp.arange(8.0 * n).reshape(8, n), replicated) for n in range(1, 13)}
  compiles = []

  def on_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  try:
    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=True)
    ckpt.save(1, state, {"x": 1})
    ckpt.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(on_compile)
  assert compiles == [], compiles
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  reader = Checkpointer(str(tmp_path), keep=1, async_save=False, read_only=True)
  restored = reader.restore(1, target)
  reader.close()
  assert all(np.array_equal(restored[k], state[k]) for k in state)


def _run(config, workdir, steps):
  config.train.num_steps = steps
  return train.run(config, str(workdir))


def _corrupt_newest(checkpoints: pathlib.Path, step: int) -> pathlib.Path:
  files = [p for p in (checkpoints / str(step) / "state").rglob("*") if p.is_file() and "manifest" not in p.name]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0x5A
  target.write_bytes(bytes(data))
  return target


def test_a_corrupted_newest_step_falls_back_to_the_previous_one(tmp_path, caplog):
  config = _config()
  config.checkpoint.every = 2
  config.logging.every = 1
  _run(config, tmp_path, 4)
  checkpoints = tmp_path / "checkpoints"
  inspect = [sys.executable, "-m", "tmlx.checkpoint", "inspect", str(tmp_path), "--verify"]
  ok = subprocess.run(inspect, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "steps [2, 4]" in ok.stdout and "arrays match" in ok.stdout and '"num_steps": 4' in ok.stdout
  assert "params/blocks/attn/wq" in ok.stdout and "data position {'step': 4" in ok.stdout
  wq = next(line for line in ok.stdout.splitlines() if "params/blocks/attn/wq" in line)
  assert wq.split("MiB")[1].strip().startswith("P("), wq  # the PartitionSpec it was saved with

  _corrupt_newest(checkpoints, 4)
  bad = subprocess.run(inspect, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and ("MISMATCH" in bad.stdout or "UNREADABLE" in bad.stdout)
  with caplog.at_level(logging.INFO):
    _run(config, tmp_path, 5)
  messages = [r.getMessage() for r in caplog.records]
  assert any("checkpoint step 4" in m and "unusable" in m for m in messages), messages
  assert any("resumed from checkpoint step 2" in m for m in messages)
  # The bad step was moved aside for a post-mortem, and the rerun saved step 4 afresh.
  assert len(list(checkpoints.glob("4.unusable-*"))) == 1
  assert Checkpointer(str(checkpoints), keep=3, async_save=False).all_steps() == [2, 4, 5]


def _restore_params(cfg, directory, step):
  mesh = sharding.make_mesh(cfg.mesh)
  spec = state_spec(cfg, mesh, sharding.rules_table(cfg.mesh.rules))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), spec.abstract, spec.shardings)
  ckpt = Checkpointer(str(directory / "checkpoints"), keep=3, async_save=False)
  state = ckpt.restore(step, target)
  ckpt.close()
  return {leaf_name(p): np.asarray(a) for p, a in jax.tree.leaves_with_path(jax.device_get(state.params))}


def test_params_only_restore_into_a_model_with_more_experts_a_larger_vocabulary_and_a_new_head(tmp_path, caplog):
  a = _config()
  a.checkpoint.every = 2
  _run(a, tmp_path / "a", 2)
  b = _config()
  b.model.moe.num_experts = 12  # experts 8..11 are new
  b.model.vocab_size = a.model.vocab_size + 64  # token ids 320..383 are new
  b.model.flow.width = a.model.flow.width // 2  # a different flow head
  b.init.params_from = str(tmp_path / "a")
  b.train.inject_nan_at_steps = "1"  # step 1's update is skipped: it saves the parameters as they were placed
  b.checkpoint.every = 1
  with pytest.raises(CheckpointError, match=r"parameter flow_head/\S+ is \[.*\] in the checkpoint.*init.reinit"):
    _run(b, tmp_path / "b0", 1)
  b.init.reinit = "flow_head"
  with caplog.at_level(logging.INFO):
    _run(b, tmp_path / "b", 1)
  log = "\n".join(r.getMessage() for r in caplog.records if "params_from" in r.getMessage())
  assert "initialized fresh" in log and "flow_head/" in log and ": 8..11)" in log and ": 320..383)" in log
  old, new = _restore_params(a, tmp_path / "a", 2), _restore_params(b, tmp_path / "b", 1)
  grown = 0
  for name, value in old.items():
    if name.startswith("flow_head"):
      continue
    if new[name].shape == value.shape:
      assert new[name].tobytes() == value.tobytes(), name
      continue
    axis = grown_axis(value.shape, new[name].shape)
    assert axis is not None, name
    head = np.take(new[name], np.arange(value.shape[axis]), axis=axis)
    assert head.tobytes() == value.tobytes(), name  # the saved part, placed first
    grown += 1
  assert grown >= 4  # router, experts, text embedding and head

  # init.resume_from takes the whole state of another run, step included, into a new workdir.
  c = _config()
  c.init.resume_from = str(tmp_path / "a")
  with caplog.at_level(logging.INFO):
    _run(c, tmp_path / "c", 3)
  assert any("resumed from checkpoint step 2 of" in r.getMessage() for r in caplog.records)
  steps = [json.loads(line)["step"] for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [3]
