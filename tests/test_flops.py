"""FLOPs accounting: the count agrees with XLA's cost analysis of the compiled train step."""

import functools
import types

import jax
import pytest
from flax import nnx

import data_pipelines
from tests.helpers import tiny_config
from tmlx import flops, sharding, train
from tmlx.nn.model import ModelConfig
from tmlx.state import new_model, state_spec


def matmul_heavy_config(dense: bool):
  """A config where matmuls dominate XLA's count, on one device, with one scanned step per loop.

  XLA's cost analysis counts the body of a while loop once, whatever its trip count, so the
  decoder stack and the flow head get depth 1 (their scans run once); per-layer cost is linear
  in depth by construction. capacity_factor 1 with S·k/E = 64 makes the executed expert buffers
  equal the top-k routed work.
  """
  c = tiny_config("tiny")
  c.mesh.data, c.mesh.expert = 1, 1
  c.data.seq_len, c.data.global_batch_size = 256, 2
  m = c.model
  m.compute_dtype = "float32"
  m.attention_window = 0  # causal: the window's credit is tests/test_attention.py's
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 256, 4, 2, 64
  m.num_layers, m.flow.depth = 1, 1
  m.moe.d_ff, m.moe.capacity_factor = 512, 1.0
  if dense:
    m.moe.num_experts, m.moe.num_experts_per_tok, m.moe.num_shared_experts = 1, 1, 0
  return c


def xla_flops_per_position(config) -> float:
  """XLA's FLOP count of one compiled train step, per sequence position of the batch."""
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  sc = train.step_config(config, spec, mesh, rules)
  b = config.data.global_batch_size
  fields = data_pipelines.row_spec(config).fields()
  batch = {k: jax.ShapeDtypeStruct((b, *shape), dtype) for k, (shape, dtype) in fields.items()}
  step = jax.jit(functools.partial(train.train_step, sc=sc))
  cost = step.lower(spec.abstract, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / (b * config.data.seq_len)


# Our count covers matmuls only; XLA also counts elementwise work (norms, softmax, SiLU/GELU,
# one-hot compares, the AdamW update), so ours must be below XLA's. At these sizes that
# elementwise work is under 5% of the total (measured: 2.8% dense, 2.9% MoE, with jax 0.10.2).
LOWER, UPPER = 0.95, 1.0


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "moe"])
def test_flops_per_token_matches_xla_cost_analysis(dense):
  config = matmul_heavy_config(dense)
  executed = flops.flops_per_token(config, count="executed")
  ratio = executed / xla_flops_per_position(config)
  assert LOWER < ratio <= UPPER, f"executed flops_per_token / XLA flops = {ratio:.4f}"
  # With integral capacity the two counts differ only in the causal half of attention.
  model, full = flops.flop_breakdown(config), flops.flop_breakdown(config, count="executed")
  s = config.data.seq_len
  assert model.routed_experts == full.routed_experts
  assert model.attention_mix == pytest.approx(full.attention_mix * (s + 1) / 2 / s)
  assert flops.flops_per_token(config) == pytest.approx(model.total)


def test_executed_count_follows_expert_capacity():
  config = tiny_config("tiny")
  config.model.moe.capacity_factor = 2.0  # C = 2·S·k/E: twice the routed work
  model, executed = flops.flop_breakdown(config), flops.flop_breakdown(config, count="executed")
  assert executed.routed_experts == pytest.approx(2 * model.routed_experts)
  config.model.moe.transport = "ragged"  # no buffers: the grouped matmul runs the k·S assignments
  assert flops.flop_breakdown(config, count="executed").routed_experts == model.routed_experts
  with pytest.raises(ValueError, match="count="):
    flops.flop_breakdown(config, count="hardware")


def test_decoder_flops_are_six_per_active_matmul_parameter():
  """Independently of the formulas: each active decoder weight costs 6 FLOPs per token."""
  config = tiny_config("tiny")
  cfg = ModelConfig.from_config(config.model)
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: new_model(cfg, 0))))
  routed_share = cfg.moe.num_experts_per_tok / cfg.moe.num_experts
  weights = {"wq": 1, "wk": 1, "wv": 1, "wo": 1, "router": 1, "shared_gate": 1, "shared_up": 1, "shared_down": 1}
  weights |= {"w_gate": routed_share, "w_up": routed_share, "w_down": routed_share}
  active = sum(
    leaf.size * weights.get(str(path[-1].key), 0) for path, leaf in jax.tree.leaves_with_path(params["blocks"])
  )
  b = flops.flop_breakdown(config)
  assert b.attention_proj + b.router + b.routed_experts + b.shared_experts == pytest.approx(6 * active)


def test_peak_flops_and_mfu():
  peak = flops.measure_cpu_peak("float32", size=256, repeats=3)
  assert 1e8 < peak < 1e14
  h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  assert flops.peak_flops_per_device(h100, "bfloat16") == (989e12, "table: bf16 dense peak of 'NVIDIA H100 80GB HBM3'")
  value, where = flops.peak_flops_per_device(types.SimpleNamespace(platform="tpu", device_kind="TPU v9"), "bfloat16")
  assert value is None and "PEAK_FLOPS" in where
  value, where = flops.peak_flops_per_device(jax.devices()[0], "float32")
  assert value > 0 and where.startswith("measured")
  assert flops.mfu(1e9, 1e3, 4, 1e12) == pytest.approx(0.25)
