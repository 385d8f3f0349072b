"""Golden files for what must not drift silently, and the full 276B-A12B train step traced on its pod.

A change to a preset, to a default of experiments/base.py, to the rules table, or to a parameter's
name or shape changes what a run trains or how it lies on the chips. The files in tests/golden/
hold, for every experiment preset and its :tiny variant:

  <preset>[.tiny].config.json      the resolved config (`config.to_dict()`), keys sorted
  <preset>[.tiny].shardings-8.json  each variable's shape, dtype and PartitionSpec on 8 fake devices
                                    (the :tiny variant, and the full preset where its mesh fits 8)
  <preset>.shardings-<N>.json       the same for a pod preset at full size on its N-device
                                    AbstractMesh (POD_DEVICES)

so that such a change shows up in review as a diff instead of on the pod. After a deliberate change:

  TMLX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

rewrites the files (printing what changed); review and commit the diff with the change.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import data_pipelines
from tests.helpers import ROOT
from tmlx import config as config_lib
from tmlx import plan, sharding, train
from tmlx.state import state_spec

GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("TMLX_UPDATE_GOLDEN") == "1"
REGENERATE = (
  "If the change is intended, regenerate the golden files and commit their diff with it:\n"
  "  TMLX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py"
)
# Lines of unified diff shown in a failure; the rest is counted.
MAX_DIFF_LINES = 40

PRESETS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem not in ("__init__", "base"))
# The fake CPU devices of tests/conftest.py.
FAKE_DEVICES = 8
# Presets whose full size runs only on a pod: the device count their shardings are pinned at.
POD_DEVICES = {"interaction_276b": 256}


@dataclasses.dataclass(frozen=True)
class Variant:
  preset: str  # module name under experiments/
  arg: str | None  # get_config's argument: None (the preset itself) or 'tiny'

  @property
  def name(self) -> str:
    return self.preset + (f".{self.arg}" if self.arg else "")

  @property
  def flag(self) -> str:
    """As written on the command line: --config=experiments/sample_cpu.py:tiny."""
    return f"experiments/{self.preset}.py" + (f":{self.arg}" if self.arg else "")

  def config(self):
    return importlib.import_module(f"experiments.{self.preset}").get_config(self.arg)


def _variants() -> list[Variant]:
  out = []
  for preset in PRESETS:
    out.append(Variant(preset, None))
    try:
      Variant(preset, "tiny").config()
    except ValueError:  # the preset has no tiny variant
      continue
    out.append(Variant(preset, "tiny"))
  return out


def _fits(config, num_devices: int) -> bool:
  try:
    config_lib.validate(config, num_devices)
  except config_lib.ConfigError:
    return False
  return True


def _has_dict(value) -> bool:
  return isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(map(_has_dict, value)))


def _pretty(value, depth: int = 0) -> str:
  """JSON with one field per line and short lists on one line (a rule of the rules table is
  one line), so that a diff shows whole fields. Tuples become lists; a value JSON cannot hold
  fails here, naming its type."""
  pad = "  " * (depth + 1)
  if isinstance(value, dict) and value:
    items = [f"{pad}{json.dumps(str(k))}: {_pretty(value[k], depth + 1)}" for k in sorted(value)]
    return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
  if isinstance(value, (list, tuple)) and value:
    flat = json.dumps(value, ensure_ascii=False)
    if len(pad) + len(flat) <= 100 and not _has_dict(value):
      return flat
    return "[\n" + ",\n".join(pad + _pretty(v, depth + 1) for v in value) + "\n" + "  " * depth + "]"
  return json.dumps(value, ensure_ascii=False)


def config_text(config) -> str:
  return _pretty(config.to_dict()) + "\n"


def _path_name(path) -> str:
  """'blocks/moe/w_up', as in plan.variable_layouts."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _spec_json(spec: PartitionSpec) -> list:
  return [list(axes) if isinstance(axes, tuple) else axes for axes in spec]


def shardings_text(variant: Variant, mesh) -> str:
  """The layout of every variable, one per line, so that a diff names exactly the variables that moved."""
  config = variant.config()
  config_lib.validate(config, mesh.size)
  header = {"experiment": variant.flag, "num_devices": mesh.size, "mesh": dict(mesh.shape)}
  items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
  for group, table in plan.variable_layouts(config, mesh).items():
    rows = [
      f"    {json.dumps(path)}: " + json.dumps({"shape": list(v.shape), "dtype": v.dtype, "spec": _spec_json(v.spec)})
      for path, v in sorted(table.items())
    ]
    items.append(
      f"  {json.dumps(group)}: {{\n" + ",\n".join(rows) + "\n  }" if rows else f"  {json.dumps(group)}: {{}}"
    )
  return "{\n" + ",\n".join(items) + "\n}\n"


def _fake_mesh(config):
  return sharding.make_mesh(config.mesh, jax.devices()[:FAKE_DEVICES])


def golden_files() -> dict:
  """File name → function returning the file's current text (built only when its test runs)."""
  files = {}
  for v in _variants():
    files[f"{v.name}.config.json"] = functools.partial(lambda v: config_text(v.config()), v)
    # A tiny variant must fit the fake devices; shardings_text then fails naming the config error.
    if v.arg == "tiny" or _fits(v.config(), FAKE_DEVICES):
      files[f"{v.name}.shardings-{FAKE_DEVICES}.json"] = functools.partial(
        lambda v: shardings_text(v, _fake_mesh(v.config())), v
      )
    if v.arg is None and v.preset in POD_DEVICES:
      n = POD_DEVICES[v.preset]
      files[f"{v.name}.shardings-{n}.json"] = functools.partial(
        lambda v, n: shardings_text(v, plan.abstract_mesh(v.config().mesh, n)), v, n
      )
  return files


GOLDEN_FILES = golden_files()


def _diff(old: str, new: str, name: str) -> str:
  lines = list(
    difflib.unified_diff(old.splitlines(), new.splitlines(), f"tests/golden/{name}", "current", n=1, lineterm="")
  )
  shown = lines[:MAX_DIFF_LINES]
  if len(lines) > MAX_DIFF_LINES:
    shown.append(f"... {len(lines) - MAX_DIFF_LINES} more diff lines")
  return "\n".join(shown)


@pytest.mark.parametrize("name", sorted(GOLDEN_FILES))
def test_golden_file(name, capsys):
  current = GOLDEN_FILES[name]()
  json.loads(current)  # the writer above hand-joins lines: it must still be JSON
  path = GOLDEN / name
  stored = path.read_text(encoding="utf-8") if path.exists() else None
  if stored == current:
    return
  if UPDATE:
    GOLDEN.mkdir(exist_ok=True)
    path.write_text(current, encoding="utf-8")
    with capsys.disabled():
      print(f"\n{'created' if stored is None else 'updated'} tests/golden/{name}")
      if stored is not None:
        print(_diff(stored, current, name))
    return
  if stored is None:
    pytest.fail(f"tests/golden/{name} is missing.\n{REGENERATE}")
  diff = _diff(stored, current, name)
  pytest.fail(f"tests/golden/{name} differs from the current value; first differences:\n{diff}\n{REGENERATE}")


def test_no_stale_golden_files(capsys):
  """A file for a preset that no longer exists (or no longer fits its mesh) would pin nothing."""
  stale = sorted(p.name for p in GOLDEN.glob("*.json") if p.name not in GOLDEN_FILES)
  if stale and UPDATE:
    for name in stale:
      (GOLDEN / name).unlink()
    with capsys.disabled():
      print(f"\nremoved stale golden files: {stale}")
    return
  assert not stale, f"golden files that no test produces: {stale}.\n{REGENERATE}"


def test_every_preset_has_golden_files():
  # The pod preset's full size is pinned on its pod; every other preset has its tiny variant here.
  for preset in PRESETS:
    assert f"{preset}.config.json" in GOLDEN_FILES
    assert any(n.startswith(f"{preset}.") and ".shardings-" in n for n in GOLDEN_FILES), preset
  assert "interaction_276b.shardings-256.json" in GOLDEN_FILES


# Metrics of train_step: name → shape, in terms of L (layers) and E (experts).
SCALAR_METRICS = (
  "loss",
  "text_loss",
  "flow_loss",
  "load_balance_loss",
  "router_z_loss",
  "router_entropy",
  "moe_dropped_fraction",
  "grad_norm",
  "update_norm",
  "bad_step",
  "learning_rate",
  "text_targets",
  "audio_targets",
  "text_targets_overflow",
  "audio_targets_overflow",
  "tokens",
  "positions",
)
PER_LAYER_METRICS = ("moe/dropped_fraction", "moe/router_entropy", "moe/load_balance_loss", "moe/router_z_loss")


def test_276b_train_step_traces_on_its_pod_mesh():
  """The full interaction_276b step, traced and lowered for GPU and TPU on its 256-device pod.

  Mirrors the "Compile once" section of `train.run`: the same jit with the state and batch
  shardings in and out and the state donated, on abstract values carrying those shardings, over an
  AbstractMesh. Nothing is allocated and nothing compiled; what it catches is a model or step that
  no longer traces at full size (a sharding constraint or shard_map that breaks on the pod mesh, a
  shape that only goes wrong at 56 layers and 256 experts), outputs of the wrong shape or dtype,
  and a state that could no longer be donated (each output must alias its input buffer).

  jax 0.10 with Auto mesh axes gives `jax.eval_shape` outputs no sharding (None): in GSPMD mode the
  layout of an output is chosen by XLA when compiling unless out_shardings fixes it, which is what
  `run` does; the lowered step's `out_info` carries those shardings.
  """
  config = importlib.import_module("experiments.interaction_276b").get_config()
  num_devices = POD_DEVICES["interaction_276b"]
  config_lib.validate(config, num_devices)
  mesh = plan.abstract_mesh(config.mesh, num_devices)
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  row = data_pipelines.row_spec(config)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, len(shape) + 1) for k, (shape, _) in row.fields().items()}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), spec.abstract, spec.shardings)
  batch = {
    k: jax.ShapeDtypeStruct((config.data.global_batch_size, *shape), dtype, sharding=batch_sh[k])
    for k, (shape, dtype) in row.fields().items()
  }
  replicated = NamedSharding(mesh, PartitionSpec())
  step_fn = jax.jit(
    functools.partial(train.train_step, sc=train.step_config(config, spec, mesh, rules)),
    in_shardings=(spec.shardings, batch_sh),
    out_shardings=(spec.shardings, replicated),
    donate_argnums=(0,),
  )
  live_bytes = sum(a.nbytes for a in jax.live_arrays())
  # An AbstractMesh names no devices, so the platforms to lower for are given: the pod's chips.
  lowered = step_fn.trace(state, batch).lower(lowering_platforms=("cuda", "tpu"))
  assert sum(a.nbytes for a in jax.live_arrays()) - live_bytes < 1 << 20, "tracing allocated device memory"
  new_state, metrics = lowered.out_info

  # The new state: the input's tree, and leaf by leaf its shape, dtype and sharding.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  changed = [
    f"{jax.tree_util.keystr(path)}: {new.shape} {new.dtype} {new.sharding.spec}, "
    f"was {old.shape} {old.dtype} {old.sharding.spec}"
    for (path, old), new in zip(jax.tree.leaves_with_path(state), jax.tree.leaves(new_state), strict=True)
    if (new.shape, new.dtype, new.sharding.mesh, new.sharding.spec) != (old.shape, old.dtype, mesh, old.sharding.spec)
  ]
  assert not changed, "state leaves changed across the step:\n" + "\n".join(changed[:20])
  # The intended layout: parameters and model state as the reviewed golden file has them, Adam's
  # moments exactly like their parameters, the counters replicated.
  golden_path = GOLDEN / f"interaction_276b.shardings-{num_devices}.json"
  assert golden_path.exists(), f"tests/golden/{golden_path.name} is missing.\n{REGENERATE}"
  golden = json.loads(golden_path.read_text(encoding="utf-8"))
  for group in ("params", "model_state"):
    layout = {
      _path_name(path): {"shape": list(x.shape), "dtype": x.dtype.name, "spec": _spec_json(x.sharding.spec)}
      for path, x in jax.tree.leaves_with_path(getattr(new_state, group))
    }
    assert layout == golden[group], f"the step's output {group} differ from tests/golden/{golden_path.name}"
  param_specs = {_path_name(p): x.sharding.spec for p, x in jax.tree.leaves_with_path(new_state.params)}
  moments = 0
  for path, x in jax.tree.leaves_with_path(new_state.opt_state):
    moment = [i for i, k in enumerate(path) if getattr(k, "name", None) in ("mu", "nu")]
    if moment:
      moments += 1
      assert x.sharding.spec == param_specs[_path_name(path[moment[0] + 1 :])], jax.tree_util.keystr(path)
    else:
      assert x.shape == () and x.sharding.spec == PartitionSpec(), jax.tree_util.keystr(path)
  assert moments == 2 * len(param_specs)
  assert new_state.step.shape == () and new_state.step.dtype == jnp.int32
  assert new_state.step.sharding.spec == PartitionSpec()
  # Every state buffer is donated and aliased to its output: the step needs no second copy of the
  # 276B parameters and their optimizer state.
  assert lowered.as_text().count("tf.aliasing_output") == len(jax.tree.leaves(state))

  # Metrics: replicated float32 scalars, per-layer [L] arrays and the expert load [L, E].
  layers, experts = config.model.num_layers, config.model.moe.num_experts
  want = {k: () for k in SCALAR_METRICS} | {k: (layers,) for k in PER_LAYER_METRICS}
  want["moe/expert_load"] = (layers, experts)
  assert {k: v.shape for k, v in metrics.items()} == want
  assert {k for k, v in metrics.items() if v.dtype != jnp.float32 or v.sharding.spec != PartitionSpec()} == set()
