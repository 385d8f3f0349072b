"""Config validation: each error names the field and what is wrong."""

import importlib

import pytest

from experiments import base
from tests.helpers import ROOT, run_main
from tmlx.config import ConfigError, validate

PRESETS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem not in ("__init__", "base"))


def tiny():
  return importlib.import_module("experiments.tiny").get_config()


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
  proc = run_main("experiments/tiny.py", tmp_path, "--config.model.d_modle=64")
  assert proc.returncode != 0
  assert "d_modle" in proc.stderr


def test_cli_rejects_invalid_config(tmp_path):
  proc = run_main("experiments/tiny.py", tmp_path, "--config.model.num_kv_heads=3")
  assert proc.returncode != 0
  assert "config.model.num_heads=4 is not divisible by config.model.num_kv_heads=3" in proc.stderr
