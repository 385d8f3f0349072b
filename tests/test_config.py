"""Config validation: each error names the field and what is wrong."""

import importlib

import pytest

from experiments import base
from tests.helpers import ROOT, run_main
from tmlx.config import ConfigError, validate

PRESETS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem not in ("__init__", "base"))


def tiny():
  return importlib.import_module("experiments.sample_cpu").get_config()


def test_tiny_is_valid_on_8_devices():
  validate(tiny(), num_devices=8)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_only_override_base_keys(preset):
  mod = importlib.import_module(f"experiments.{preset}")
  for arg in (None, "tiny"):
    validate(mod.get_config(arg))  # schema: no added or missing keys, right types


def test_unknown_key():
  c = tiny()
  c.model.moe.num_expert = 4  # misspelled: ConfigDict is unlocked here, validation catches it
  with pytest.raises(ConfigError, match=r"config\.model\.moe\.num_expert: unknown key"):
    validate(c)


def test_wrong_type():
  c = base.get_config()
  c.unlock()
  del c.data["seq_len"]
  c.data.seq_len = "long"
  with pytest.raises(ConfigError, match=r"config\.data\.seq_len='long': wrong type str, expected int"):
    validate(c)


def test_mesh_size_must_equal_device_count():
  c = tiny()
  c.mesh.data = 4  # 4 x 4 = 16 ≠ 8
  with pytest.raises(ConfigError, match=r"config\.mesh: axis sizes .* multiply to 16 but there are 8 devices"):
    validate(c, num_devices=8)


def test_mesh_fill_axis():
  c = tiny()
  c.mesh.data = -1
  validate(c, num_devices=8)  # data fills to 2
  c.mesh.expert = 3
  with pytest.raises(ConfigError, match="cannot fill axis 'data'"):
    validate(c, num_devices=8)


def test_batch_not_divisible_by_data_axes():
  c = tiny()
  c.data.global_batch_size = 12  # batch splits over data x expert = 8
  with pytest.raises(ConfigError, match=r"global_batch_size=12 .* not divisible by the data axes"):
    validate(c, num_devices=8)


def test_experts_not_divisible_by_expert_axis():
  c = tiny()
  c.model.moe.num_experts = 6
  with pytest.raises(ConfigError, match=r"moe\.num_experts=6 is not divisible by the mesh's expert axis"):
    validate(c, num_devices=8)


def test_heads_not_divisible_by_kv_heads():
  c = tiny()
  c.model.num_heads = 6
  c.model.num_kv_heads = 4
  with pytest.raises(ConfigError, match=r"model\.num_heads=6 is not divisible by config\.model\.num_kv_heads=4"):
    validate(c)


def test_sequence_too_short_for_one_micro_turn():
  c = tiny()
  c.data.seq_len = 12  # an 80x80 frame has 4 patches: 14 positions needed
  with pytest.raises(ConfigError, match=r"config\.data\.seq_len=12 is too short for one micro-turn: it needs 14"):
    validate(c)


def test_bad_choice():
  c = tiny()
  c.model.remat = "sometimes"
  with pytest.raises(ConfigError, match=r"config\.model\.remat='sometimes': expected one of"):
    validate(c)


def test_cli_rejects_unknown_override(tmp_path):
  """The locked config of tmlx.main fails on a misspelled override, naming it."""
  proc = run_main("experiments/sample_cpu.py", tmp_path, "--config.model.d_modle=64")
  assert proc.returncode != 0
  assert "d_modle" in proc.stderr


def test_cli_rejects_invalid_config(tmp_path):
  proc = run_main("experiments/sample_cpu.py", tmp_path, "--config.model.num_kv_heads=3")
  assert proc.returncode != 0
  assert "config.model.num_heads=4 is not divisible by config.model.num_kv_heads=3" in proc.stderr


def test_parse_arg_reads_known_keys_with_their_defaults_and_types():
  spec = dict(tiny=False, size="", steps=0, lr=0.5)
  assert base.parse_arg(None, "experiments/x.py", **spec).to_dict() == spec
  assert base.parse_arg("", "experiments/x.py", **spec).to_dict() == spec
  got = base.parse_arg("tiny, size=69m,steps=10,lr=1e-3", "experiments/x.py", **spec)
  assert got.to_dict() == dict(tiny=True, size="69m", steps=10, lr=1e-3)
  assert base.parse_arg("tiny=false", "experiments/x.py", **spec).tiny is False


@pytest.mark.parametrize(
  "arg, message",
  [
    ("sise=tiny", "experiments/sample_cpu.py: unknown argument key 'sise' in 'sise=tiny' (known: size, tiny)"),
    ("tinyy", "experiments/sample_cpu.py: unknown argument key 'tinyy' in 'tinyy' (known: size, tiny)"),
    ("tiny=maybe", "experiments/sample_cpu.py: bad value 'maybe' for argument key 'tiny' (expected bool)"),
    ("size", "experiments/sample_cpu.py: argument key 'size' needs a value (size=...)"),
    ("size=huge", "experiments/sample_cpu.py: unknown size='huge' (known: " + ", ".join(base.SIZES) + ")"),
  ],
)
def test_a_bad_preset_argument_fails_in_one_line_naming_the_file_and_key(arg, message):
  with pytest.raises(ValueError) as e:
    importlib.import_module("experiments.sample_cpu").get_config(arg)
  assert str(e.value) == message


def test_a_bad_value_of_a_typed_key_names_its_type():
  want = r"^experiments/x\.py: bad value 'ten' for argument key 'steps' \(expected int\)$"
  with pytest.raises(ValueError, match=want):
    base.parse_arg("steps=ten", "/anywhere/experiments/x.py", steps=0)


def test_size_table_rows_set_every_size_field():
  # The tiny row is base.py's defaults: a preset at size tiny overrides no model dimension.
  assert base.apply_size(base.get_config(), "tiny", "experiments/x.py") == base.get_config()
  for name, row in base.SIZES.items():
    assert len(row) == len(base.SIZE_FIELDS), name
  # `size=` picks the row: the 276B preset's test variant is its recipe at size 276b-tiny.
  mod = importlib.import_module("experiments.interaction_276b")
  assert mod.get_config("tiny,size=276b-tiny") == mod.get_config("tiny")
  assert mod.get_config("size=276b") == mod.get_config()
  assert mod.get_config("size=tiny").model.d_model == 128


def test_every_group_dataclass_has_exactly_the_fields_of_its_group():
  """A field added to base.py without its dataclass (or the other way round) would go unchecked."""
  import dataclasses
  import typing

  from tmlx.config import GROUPS

  schema = base.get_config()

  def names(cls, group, prefix):
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    assert set(hints) == set(group.keys()), f"{cls.__name__} and config.{prefix} differ"
    for f in dataclasses.fields(cls):
      if hasattr(group[f.name], "keys"):
        names(typing.get_type_hints(cls)[f.name], group[f.name], f"{prefix}.{f.name}")

  others = {"seed", "stream", "mesh", "mesh_rules"}  # StreamConfig, tmlx.sharding, accelerators
  assert set(schema.keys()) == set(GROUPS) | others
  for name, cls in GROUPS.items():
    names(cls, schema[name], name)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    (
      "data.synthetic.max_window",
      2,
      "config.data.synthetic.max_window=2: must be >= config.data.synthetic.min_window=4",
    ),  # noqa: E501
    ("data.num_workers", -1, "config.data.num_workers=-1: must be in [0, inf]"),
    ("loss.max_text_target_fraction", 1.5, "config.loss.max_text_target_fraction=1.5: must be in [0.0, 1.0]"),
    (
      "init.reinit",
      "text_head",
      "config.init.reinit='text_head': names parameters to initialize fresh, which needs config.init.params_from",
    ),
    ("train.step_timeout_s", -1, "config.train.step_timeout_s=-1: must be in [0, inf]"),
  ],
)
def test_group_dataclasses_name_the_bad_field_with_its_path(field, value, message):
  config = base.get_config()
  group, leaf = field.rsplit(".", 1)
  node = config
  for part in group.split("."):
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert str(e.value) == message


def test_an_at_sign_in_a_value_is_shown_as_it_is():
  config = base.get_config()
  config.data.source = "episodes"
  config.data.mixture = "gs://b/x@2:heavy"
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert str(e.value) == "config.data.mixture='gs://b/x@2:heavy': weight 'heavy' of 'gs://b/x@2' is not a number"
