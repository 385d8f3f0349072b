"""The MoE layer: every transport on several meshes against a loop-over-experts reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from experiments import base
from tmlx import sharding
from tmlx.nn.common import Dtypes
from tmlx.nn.moe import MoE, MoEConfig, balance_bias_update, capacity, dispatch_plan, route, swiglu

D, E, K, F, B, S = 16, 8, 2, 16, 8, 16
MESHES = {
  "expert8": dict(data=1, fsdp=1, expert=8, tensor=1),
  "data2_expert4": dict(data=2, fsdp=1, expert=4, tensor=1),
  "data2_expert2_tensor2": dict(data=2, fsdp=1, expert=2, tensor=2),
}
TRANSPORTS = ("local", "all_to_all", "ragged", "dropless")
# (transport, capacity factor): dropless takes no capacity.
CASES = [(t, cf) for t in TRANSPORTS for cf in (0.0, 0.5) if not (t == "dropless" and cf)]


def make_moe(capacity_factor=0.0, shared=1, transport="local", score="softmax"):
  cfg = MoEConfig(
    num_experts=E,
    num_experts_per_tok=K,
    num_shared_experts=shared,
    d_ff=F,
    capacity_factor=capacity_factor,
    renormalize=True,
    router_score=score,
    transport=transport,
  )
  with nnx.use_eager_sharding(False):
    return MoE(D, cfg, rngs=nnx.Rngs(0), dtypes=Dtypes())


def _inputs():
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  lengths = jnp.array([S, S - 5, S, 3, S, S, S - 1, S])  # some rows end in padding
  return x, jnp.arange(S)[None] < lengths[:, None]


def expected_kept(experts, mask, cap):
  """Numpy replay of the capacity rule: first choices before second choices, then by position."""
  ex, mk = np.asarray(experts), np.asarray(mask)
  kept = np.zeros((ex.shape[0], S, K), bool)
  for b in range(ex.shape[0]):
    fill = [0] * E
    for j in range(K):
      for t in range(S):
        if mk[b, t] and fill[ex[b, t, j]] < cap:
          fill[ex[b, t, j]] += 1
          kept[b, t, j] = True
  return kept


def reference(params, x, mask, cfg: MoEConfig, kept):
  """Loop over experts: each token through the experts it kept, weighted by the router."""
  logits = jnp.einsum("bsd,de->bse", x, params["router"])
  r = route(logits, cfg.num_experts_per_tok, score=cfg.router_score, renormalize=cfg.renormalize)
  y = jnp.zeros_like(x)
  for e in range(cfg.num_experts):
    out_e = swiglu(x, params["w_gate"][e], params["w_up"][e], params["w_down"][e])
    y = y + out_e * jnp.sum(jnp.where((r.experts == e) & kept, r.weights, 0.0), axis=-1)[..., None]
  if cfg.num_shared_experts:
    y = y + swiglu(x, params["shared_gate"], params["shared_up"], params["shared_down"])
  return y


def _loss(y, mask):
  return jnp.sum(jnp.sin(y) * mask[..., None])


@pytest.mark.parametrize("mesh_name,transport,capacity_factor", [(m, *case) for m in MESHES for case in CASES])
def test_transport_matches_loop_over_experts(mesh_name, transport, capacity_factor):
  c = base.get_config()
  c.mesh.update(MESHES[mesh_name])
  mesh = sharding.make_mesh(c.mesh)
  table = sharding.rules_table(c.mesh.rules)
  moe = make_moe(capacity_factor, transport=transport)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  shardings = sharding.state_shardings(nnx.state(moe, nnx.Param), mesh, table)
  x, mask = _inputs()
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", None, None), table))

  @jax.jit
  def layer(p, x):
    with sharding.use_mesh_rules(mesh, table):

      def f(p, x):
        y, stats = nnx.merge(graphdef, p, rest)(x, mask)
        return _loss(y, mask), (y, stats)

      return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, x)

  (_, (y, stats)), (g_p, g_x) = layer(jax.device_put(params, shardings), jax.device_put(x, batch_sh))

  logits = jnp.einsum("bsd,de->bse", x, params["router"])
  experts = route(logits, K).experts
  kept = expected_kept(experts, mask, capacity(moe.cfg, S))

  def ref_loss(p, x):
    y = reference(p, x, mask, moe.cfg, kept)
    return _loss(y, mask), y

  (_, y_ref), (r_p, r_x) = jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True)(params, x)
  m = mask[..., None]
  np.testing.assert_allclose(y * m, y_ref * m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-5)
  for name in ("router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"):
    np.testing.assert_allclose(g_p[name], r_p[name], rtol=1e-4, atol=1e-5, err_msg=name)
  reference_dropped = int(np.asarray(mask).sum()) * K - int(kept.sum())
  assert int(stats.dropped) == reference_dropped
  assert (reference_dropped > 0) == (capacity_factor > 0)


def test_dispatch_plan_capacity_order():
  x, mask = _inputs()
  moe = make_moe(capacity_factor=0.5, shared=0)
  cap = capacity(moe.cfg, S)
  experts = route(jnp.einsum("bsd,de->bse", x, moe.router[...]), K).experts
  plan = dispatch_plan(experts, mask, E, cap)
  kept = expected_kept(experts, mask, cap).transpose(0, 2, 1).reshape(B, K * S)
  np.testing.assert_array_equal(np.asarray(plan.kept), kept)
  # Every kept assignment owns a distinct slot of its expert; every filled slot names its token.
  for b in range(B):
    slots = np.asarray(plan.slot[b])[kept[b]]
    assert len(set(slots)) == len(slots)
    tokens = np.asarray(plan.token[b])
    for a in np.flatnonzero(kept[b]):
      assert tokens[slots[list(np.flatnonzero(kept[b])).index(a)]] == a % S


def test_sigmoid_router_and_balancing_bias():
  logits = jax.random.normal(jax.random.key(3), (2, S, E))
  r = route(logits, K, score="sigmoid", renormalize=False)
  np.testing.assert_allclose(r.weights, jnp.take_along_axis(jax.nn.sigmoid(logits), r.experts, -1), rtol=1e-6)
  # A large bias on expert 0 makes it everyone's choice without changing the weights' source.
  bias = jnp.zeros(E).at[0].set(10.0)
  rb = route(logits, K, score="sigmoid", renormalize=False, bias=bias)
  assert bool(jnp.all(jnp.any(rb.experts == 0, axis=-1)))
  np.testing.assert_allclose(rb.weights, jnp.take_along_axis(jax.nn.sigmoid(logits), rb.experts, -1), rtol=1e-6)
  # The update lowers over-loaded experts' bias and raises under-loaded ones.
  load = jnp.array([0.5, 0.3, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0])
  new = balance_bias_update(jnp.zeros(E), load, 0.01)
  np.testing.assert_allclose(new, [-0.01, -0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], rtol=1e-6)  # mean 1/8


@pytest.mark.parametrize("cf,expected", [(0.0, S), (1.0, 4), (100.0, S)])
def test_capacity(cf, expected):
  cfg = MoEConfig(E, K, 0, F, cf, True)
  assert capacity(cfg, S) == expected


@pytest.mark.parametrize("tokens", [1, S], ids=["gathered_experts", "every_expert"])
def test_decode_matches_the_dropless_layer(tokens):
  """MoE.decode (inference, no dispatch) gives each token what the dropless layer gives it."""
  moe = make_moe(0.0)
  x = jax.random.normal(jax.random.key(2), (1, tokens, D))
  y, _ = moe(x, jnp.ones((1, tokens), bool))
  np.testing.assert_allclose(moe.decode(x), y, rtol=1e-5, atol=1e-6)


def test_grouped_matmul_megablox_in_interpret_mode_matches_ragged_dot():
  """The TPU grouped matmul of the dropless transport (Pallas megablox, interpreted here) against
  ragged_dot, with rows past the groups as a receive buffer has them; gradients included."""
  from tmlx.nn.dropless import _grouped

  rows = jax.random.normal(jax.random.key(0), (256, 128))
  w = jax.random.normal(jax.random.key(1), (4, 128, 256))
  sizes = jnp.array([50, 0, 77, 100], jnp.int32)  # 227 of 256 rows in groups
  used = (jnp.arange(256) < 227)[:, None]

  def loss(kernel):
    return lambda rows, w: jnp.sum(jnp.sin(_grouped(rows, w, sizes, kernel)) * used)

  want = jax.value_and_grad(loss("ragged_dot"), argnums=(0, 1))(rows, w)
  got = jax.value_and_grad(loss("megablox_interpret"), argnums=(0, 1))(rows, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shards, per_shard", [(2, 1), (4, 1), (8, 1), (4, 3)])
def test_emulated_ragged_all_to_all_moves_each_slice_to_its_offset(shards, per_shard):
  """The CPU stand-in for jax.lax.ragged_all_to_all against the semantics its docstring gives,
  with one slice per destination shard or several (as the dropless transport sends, one per expert)."""
  from jax.sharding import Mesh, PartitionSpec

  from tmlx.nn.dropless import emulated_ragged_all_to_all

  rng = np.random.default_rng(shards * per_shard)
  slices = shards * per_shard  # slice i goes to shard i // per_shard
  n = out_rows = 1 + 3 * slices  # up to 3 rows a slice; one free row first on every receiver
  sizes = rng.integers(0, 4, size=(shards, slices)).astype(np.int32)  # [source, slice]
  operand = rng.normal(size=(shards, n, 3)).astype(np.float32)
  input_offsets = np.cumsum(sizes, 1) - sizes
  output_offsets = np.zeros_like(sizes)
  recv_sizes = np.zeros_like(sizes)
  expected = np.full((shards, out_rows, 3), -1.0, np.float32)
  fill = np.ones(shards, int)  # next free row on each receiver
  for src in range(shards):
    for i in range(slices):
      dst, j = divmod(i, per_shard)
      output_offsets[src, i] = fill[dst]
      recv_sizes[dst, src * per_shard + j] = sizes[src, i]
      rows = operand[src, input_offsets[src, i] : input_offsets[src, i] + sizes[src, i]]
      expected[dst, fill[dst] : fill[dst] + len(rows)] = rows
      fill[dst] += len(rows)
  mesh = Mesh(np.array(jax.devices()[:shards]), ("x",))

  def one(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    args = (operand[0], output[0], input_offsets[0], send_sizes[0], output_offsets[0], recv_sizes[0])
    return emulated_ragged_all_to_all(*args, axis_name="x")[None]

  spec = PartitionSpec("x")
  run = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))
  output = np.full((shards, out_rows, 3), -1.0, np.float32)
  got = run(operand, output, input_offsets, sizes, output_offsets, recv_sizes)
  np.testing.assert_array_equal(np.asarray(got), expected)
