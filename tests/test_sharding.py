"""Mesh construction, the rules table, and sharded initialization."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments import base
from tests.helpers import tiny_config
from tmlx import sharding
from tmlx.nn.model import ModelConfig
from tmlx.state import new_model


def test_mesh_fills_minus_one_axis():
  c = tiny_config()
  c.mesh.data = -1
  mesh = sharding.make_mesh(c.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_map_logical_names_and_never_reuse_an_axis():
  table = sharding.rules_table(base.DEFAULT_RULES)
  assert sharding.logical_to_spec(("expert", "embed", "mlp"), table) == P("expert", "fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "act_seq"), table) == P(("data", "fsdp", "expert"), None)
  # 'act_expert' wants 'expert', already taken by 'batch': replicated instead.
  assert sharding.logical_to_spec(("batch", "act_expert"), table) == P(("data", "fsdp", "expert"), None)
  with pytest.raises(sharding.ShardingError, match="'nope' has no rule"):
    sharding.logical_to_spec(("nope",), table)
  with pytest.raises(sharding.ShardingError, match="appears twice"):
    sharding.rules_table((("embed", "fsdp"), ("embed", None)))
  with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
    sharding.rules_table((("embed", "model"),))


def test_state_shardings_follow_logical_axes():
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 2, 2, 2
  mesh = sharding.make_mesh(c.mesh)
  cfg = ModelConfig.from_config(c.model)
  _, abstract = nnx.split(nnx.eval_shape(lambda: new_model(cfg, 0)))
  sh = sharding.state_shardings(abstract, mesh, sharding.rules_table(c.mesh.rules))
  assert sh["blocks"]["moe"]["w_up"].spec == P(None, "expert", "fsdp", "tensor")
  assert sh["blocks"]["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
  assert sh["text_embed"]["table"].spec == P("tensor", "fsdp")
  table = sharding.describe(sh, nnx.to_pure_dict(abstract))
  assert "['blocks']['moe']['w_up']" in table


def test_indivisible_parameter_is_a_clear_error():
  c = tiny_config()
  c.mesh.data, c.mesh.expert, c.mesh.tensor = 1, 1, 8
  mesh = sharding.make_mesh(c.mesh)
  cfg = ModelConfig.from_config(c.model)  # 2 kv heads cannot split 8 ways
  _, abstract = nnx.split(nnx.eval_shape(lambda: new_model(cfg, 0)))
  with pytest.raises(sharding.ShardingError, match=r"\['wk'\]: dimension of size 2 cannot be split"):
    sharding.state_shardings(abstract, mesh, sharding.rules_table(c.mesh.rules))


def test_sharded_init_places_each_shard_on_its_device():
  c = tiny_config("tiny")
  mesh = sharding.make_mesh(c.mesh)
  cfg = ModelConfig.from_config(c.model)
  _, abstract = nnx.split(nnx.eval_shape(lambda: new_model(cfg, 0)))
  sh = sharding.state_shardings(abstract, mesh, sharding.rules_table(c.mesh.rules))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(new_model(cfg, 0))), out_shardings=sh)()
  w = params["blocks"]["moe"]["w_up"]  # [L, E=8, D, F] over expert=4
  assert w.sharding.spec[1] == "expert"
  shard_shapes = {s.data.shape for s in w.addressable_shards}
  assert shard_shapes == {(w.shape[0], w.shape[1] // 4, w.shape[2], w.shape[3])}
