"""Every attention implementation against the materialized one (`dense_attention`, the math the
model had before there was a choice), forward and gradients, over the masks a packed row makes:
causal, segments, padding, a sliding window. The Pallas kernels run in interpret mode here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import base
from tests.helpers import synthetic_batch, tiny_config, tiny_model_config
from tmlx import fields, flops, sharding
from tmlx.nn import attention, blockwise, kernels
from tmlx.state import new_model


def _inputs(s: int, *, n=4, kv=2, h=16, b=2, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(b, s, n, h), (b, s, kv, h), (b, s, kv, h)])
  # Row 0: three packed segments and padding; row 1: one segment filling the row.
  seg = np.zeros((b, s), np.int32)
  seg[0, : s // 3] = 1
  seg[0, s // 3 : s - s // 8] = 2
  seg[0, s - s // 8 : s - 5] = 7
  seg[1:] = 3
  return q, k, v, jnp.asarray(seg)


def _real(x, seg):
  return x * (seg > 0)[..., None, None]


def _check(fn, s, window, *, seed=0, tol=2e-5, **shape):
  """fn(q, k, v, seg, window) agrees with dense attention on the real positions, with gradients."""
  q, k, v, seg = _inputs(s, seed=seed, **shape)
  cot = jnp.asarray(np.random.default_rng(seed + 1).normal(size=q.shape), jnp.float32)

  def dense(q, k, v):
    return attention.dense_attention(q, k, v, attention.attention_mask(seg, window))

  def candidate(q, k, v):
    return fn(q, k, v, seg, window)

  np.testing.assert_allclose(_real(candidate(q, k, v), seg), _real(dense(q, k, v), seg), atol=tol, rtol=tol)
  loss = lambda f: lambda q, k, v: jnp.sum(_real(f(q, k, v), seg) * cot)  # noqa: E731
  got = jax.grad(loss(candidate), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, atol=tol * 5, rtol=tol * 5, err_msg=f"d{name}")


MASKS = [(64, 0), (160, 0), (160, 48), (256, 100)]  # (S, window)


@pytest.mark.parametrize("s, window", MASKS)
@pytest.mark.parametrize("block", [32, 64])
def test_blockwise_matches_dense(s, window, block):
  _check(lambda q, k, v, seg, w: blockwise.blockwise_attention(q, k, v, seg, window=w, block=block), s, window)


def test_blockwise_gives_zeros_at_padding_and_handles_a_row_that_is_not_a_multiple_of_the_block():
  q, k, v, seg = _inputs(70)
  out = blockwise.blockwise_attention(q, k, v, seg, block=32)  # padded to 96 inside
  assert out.shape == q.shape
  assert float(jnp.abs(out * (seg == 0)[..., None, None]).max()) == 0.0
  _check(lambda q, k, v, seg, w: blockwise.blockwise_attention(q, k, v, seg, window=w, block=32), 70, 9)


def test_the_schedule_visits_only_blocks_the_mask_leaves_keys_in():
  causal = blockwise.schedule(256, 64)
  assert list(zip(causal.query_blocks, causal.key_blocks)) == [(i, j) for i in range(4) for j in range(i + 1)]
  assert causal.first == (True, True, False, True, False, False, True, False, False, False)
  windowed = blockwise.schedule(256, 64, window=64)  # each query block needs its own and the previous one
  assert list(zip(windowed.query_blocks, windowed.key_blocks)) == [
    (0, 0),
    (1, 0),
    (1, 1),
    (2, 1),
    (2, 2),
    (3, 2),
    (3, 3),
  ]
  assert blockwise.visited_keys_per_query(256, 64) == 10 * 64 * 64 / 256
  with pytest.raises(ValueError, match="not a multiple of the block"):
    blockwise.schedule(100, 64)


@pytest.mark.parametrize("s, window", [(256, 0), (256, 100), (384, 128), (192, 0), (72, 9)])  # 192, 72 padded
def test_splash_kernel_in_interpret_mode_matches_dense(s, window):
  splash = functools.partial(kernels.splash_attention, block=128, interpret=True)
  _check(lambda q, k, v, seg, w: splash(q, k, v, seg, window=w), s, window, tol=3e-5)


@pytest.mark.parametrize("s", [128, 256, 96])  # 96: padded to whole blocks
def test_pallas_gpu_kernel_in_interpret_mode_matches_dense(s):
  gpu = functools.partial(kernels.pallas_gpu_attention, block=64, interpret=True)
  _check(lambda q, k, v, seg, w: gpu(q, k, v, seg, window=w), s, 0, tol=3e-5)
  with pytest.raises(ValueError, match="no sliding window"):
    gpu(*_inputs(128), window=16)


@pytest.mark.parametrize("s, window", [(128, 0), (160, 48)])
def test_the_cudnn_call_with_the_xla_implementation_matches_dense(s, window):
  # cuDNN itself needs a GPU; this checks the mask, window and layout the call hands it.
  _check(lambda q, k, v, seg, w: kernels.cudnn_attention(q, k, v, seg, window=w, implementation="xla"), s, window)


def _mesh(tensor: int) -> Mesh:
  config = tiny_config("tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = 8 // tensor, 1, 1, tensor
  return sharding.make_mesh(config.mesh, jax.devices()[:8])


@pytest.mark.parametrize(
  "tensor, n, kv", [(2, 4, 2), (4, 4, 2), (2, 6, 3)], ids=["kv-heads-split", "kv-heads-replicated", "kv-heads-repeated"]
)
@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_kernels_run_per_device_under_the_mesh_rules(impl, tensor, n, kv):
  """Rows over the batch axes and query heads over 'tensor' in shard_map: 2 kv heads split over 2
  head shards; on 4 head shards each takes the kv head its query heads share; 3 kv heads of 6
  query heads on 2 shards (a shard's heads would span two kv heads) are repeated per query head."""
  mesh, table = _mesh(tensor), sharding.rules_table(base.DEFAULT_RULES)
  fn = {"splash": kernels.splash_attention, "pallas_gpu": kernels.pallas_gpu_attention}[impl]

  def sharded(q, k, v, seg, w):
    # Replicated out: with the outputs' GSPMD shardings, jax.grad mixed up the meshes of the two cases.
    replicated = NamedSharding(mesh, PartitionSpec())
    with sharding.use_mesh_rules(mesh, table):
      run = jax.jit(lambda *a: fn(*a, window=w, block=128, interpret=True), out_shardings=replicated)
      return run(q, k, v, seg)

  _check(sharded, 256, 0, b=4, n=n, kv=kv, tol=3e-5)


def test_auto_picks_by_platform_and_a_bad_choice_fails_where_it_is_set():
  assert attention.resolve_impl("auto", "tpu", 8192, 0) == "splash"
  assert attention.resolve_impl("auto", "gpu", 8192, 0) == "pallas_gpu"
  assert attention.resolve_impl("auto", "gpu", 8192, 128) == "blockwise"
  assert attention.resolve_impl("auto", "cpu", 512, 0) == "dense"
  assert attention.resolve_impl("auto", "cpu", attention.CPU_BLOCKWISE_FROM, 0) == "blockwise"
  assert attention.resolve_impl("cudnn", "tpu", 8, 0) == "cudnn"
  with pytest.raises(ValueError, match="expected one of"):
    attention.resolve_impl("flash", "cpu", 8, 0)
  with pytest.raises(fields.FieldError, match="attention_impl='pallas_gpu' has no sliding window"):
    tiny_model_config(attention_impl="pallas_gpu", attention_window=16)
  with pytest.raises(fields.FieldError, match="attention_impl"):
    tiny_model_config(attention_impl="flash")


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_the_model_gives_the_same_hidden_states_and_gradients_with_each_implementation(impl):
  """Through the public model: a packed synthetic batch with a window, dense vs `impl`."""
  batch = synthetic_batch(tiny_config("tiny"), rows=2)
  outs = {}
  for name in ("dense", impl):
    cfg = tiny_model_config(attention_impl=name, attention_block=128, attention_window=48)
    model = new_model(cfg, 0)

    def loss(model):
      hidden = model(batch).hidden
      return jnp.sum(jnp.where((batch["segment_ids"] > 0)[..., None], hidden, 0) ** 2), hidden

    from flax import nnx

    (_, hidden), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    outs[name] = hidden, jax.tree.leaves(nnx.to_pure_dict(grads))
  real = (batch["segment_ids"] > 0)[..., None]
  np.testing.assert_allclose(outs[impl][0] * real, outs["dense"][0] * real, atol=2e-4, rtol=2e-4)
  for a, b in zip(outs[impl][1], outs["dense"][1]):
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)


def _attention_config(s: int, window: int, impl: str, block: int):
  c = tiny_config("tiny")
  c.data.seq_len = s
  c.model.attention_window, c.model.attention_impl, c.model.attention_block = window, impl, block
  return c


@pytest.mark.parametrize("window", [0, 96])
def test_attention_flops_count_what_blockwise_computes(window):
  """XLA's count of blockwise attention, forward + backward, is the executed `attention_mix` count
  of tmlx.flops (which is below the dense one). The scans are unrolled so that XLA counts every
  visit; unrolled, XLA also merges the backward's recomputed logits with the forward's (the same
  expression), so it runs the 6 matmuls per visit that FLOPs accounting counts. Our count leaves
  out the mask and softmax arithmetic: 7% of XLA's here."""
  s, block, b, n, kv, h = 512, 64, 1, 4, 2, 32
  q, k, v, seg = _inputs(s, n=n, kv=kv, h=h, b=b)
  fn = functools.partial(blockwise.blockwise_attention, window=window, block=block, unroll=True)
  # Segment ids and a cotangent as arguments: as constants, XLA would fold away blocks they mask.
  step = jax.jit(jax.grad(lambda q, k, v, seg, cot: jnp.sum(fn(q, k, v, seg) * cot), argnums=(0, 1, 2)))
  cost = step.lower(q, k, v, seg, q).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / (b * s)
  c = _attention_config(s, window, "blockwise", block)
  c.model.num_layers, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 1, n, kv, h
  counted = flops.flop_breakdown(c, count="executed").attention_mix
  assert 0.9 < counted / xla <= 1.0, (counted, xla)
  dense = flops.flop_breakdown(_attention_config(s, window, "dense", block), count="executed").attention_mix
  assert flops.flop_breakdown(c, count="executed").attention_mix < dense


def test_model_flops_count_the_keys_a_window_leaves():
  full = flops.flop_breakdown(_attention_config(512, 0, "dense", 64)).attention_mix
  windowed = flops.flop_breakdown(_attention_config(512, 64, "dense", 64)).attention_mix
  # Keys seen per query: (S+1)/2 causal; with a window W, W for all but the first W - 1 positions.
  assert windowed / full == pytest.approx((64 * 512 - 64 * 63 / 2) / 512 / (513 / 2))


def test_the_platform_is_that_of_the_mesh_devices_else_the_default_backend():
  assert sharding.platform() == jax.default_backend() == "cpu"
  with sharding.use_mesh_rules(_mesh(2), {}):
    assert sharding.platform() == "cpu"
  abstract = jax.sharding.AbstractMesh((8,), ("data",))
  with sharding.use_mesh_rules(abstract, {}):
    assert sharding.platform() == "cpu"
