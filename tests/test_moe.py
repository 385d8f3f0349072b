"""The MoE layer against a plain loop-over-experts reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmlx.nn.common import Dtypes
from tmlx.nn.moe import MoE, MoEConfig, capacity, dispatch_plan, route, swiglu

D, E, K, F, B, S = 16, 4, 2, 8, 2, 24


def make_moe(capacity_factor=0.0, shared=1):
  cfg = MoEConfig(
    num_experts=E,
    num_experts_per_tok=K,
    num_shared_experts=shared,
    d_ff=F,
    capacity_factor=capacity_factor,
    renormalize=True,
  )
  with nnx.use_eager_sharding(False):
    return MoE(D, cfg, rngs=nnx.Rngs(0), dtypes=Dtypes())


def reference(params, x, mask, cfg: MoEConfig):
  """Loop over experts: every token goes through its top-k experts (dropless)."""
  logits = jnp.einsum("bsd,de->bse", x, params["router"])
  _, weights, experts = route(logits, cfg.num_experts_per_tok, cfg.renormalize)
  y = jnp.zeros_like(x)
  for e in range(cfg.num_experts):
    out_e = swiglu(x, params["w_gate"][e], params["w_up"][e], params["w_down"][e])
    gate = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)  # [B, S]
    y = y + out_e * gate[..., None]
  y = y * mask[..., None]
  if cfg.num_shared_experts:
    y = y + swiglu(x, params["shared_gate"], params["shared_up"], params["shared_down"])
  return y


def _inputs():
  x = jax.random.normal(jax.random.key(1), (B, S, D))
  mask = jnp.arange(S)[None] < jnp.array([[S], [S - 5]])  # row 1 ends in padding
  return x, mask


def test_forward_and_gradients_match_loop_over_experts():
  moe = make_moe()
  graphdef, state = nnx.split(moe)
  params = nnx.to_pure_dict(state)
  x, mask = _inputs()

  def layer_loss(p, x):
    y, stats = nnx.merge(graphdef, p)(x, mask)
    return jnp.sum(jnp.sin(y) * mask[..., None]), (y, stats)

  def ref_loss(p, x):
    y = reference(p, x, mask, moe.cfg)
    return jnp.sum(jnp.sin(y) * mask[..., None]), y

  (_, (y, stats)), (g_p, g_x) = jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True)(params, x)
  (_, y_ref), (r_p, r_x) = jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True)(params, x)
  m = mask[..., None]
  np.testing.assert_allclose(y * m, y_ref * m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-5)
  for name in ("router", "w_gate", "w_up", "w_down", "shared_gate"):
    np.testing.assert_allclose(g_p[name], r_p[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert float(stats.dropped) == 0.0
  assert float(stats.assignments) == float(jnp.sum(mask)) * K
  np.testing.assert_allclose(float(jnp.sum(stats.expert_load)), 1.0, rtol=1e-6)


def test_capacity_drops_are_counted_and_follow_priority():
  """With tight capacity, the kept assignments and the dropped count match a numpy replay."""
  moe = make_moe(capacity_factor=0.5, shared=0)
  x, mask = _inputs()
  cap = capacity(moe.cfg, S)
  assert cap == 6
  logits = jnp.einsum("bsd,de->bse", x, moe.router[...])
  _, weights, experts = route(logits, K, True)
  plan = dispatch_plan(experts, mask, E, cap)
  y, stats = moe(x, mask)

  ex, mk = np.asarray(experts), np.asarray(mask)
  expected_kept = np.zeros((B, K * S), bool)
  for b in range(B):
    fill = [0] * E
    for j in range(K):  # all first choices, then all second choices
      for t in range(S):
        if mk[b, t] and fill[ex[b, t, j]] < cap:
          fill[ex[b, t, j]] += 1
          expected_kept[b, j * S + t] = True
  np.testing.assert_array_equal(np.asarray(plan.kept), expected_kept)
  assert float(stats.dropped) == float(mk.sum() * K - expected_kept.sum()) > 0

  # The output equals the reference with dropped assignments' weights set to zero.
  kept = expected_kept.reshape(B, K, S).transpose(0, 2, 1)
  y_ref = jnp.zeros_like(x)
  for e in range(E):
    out_e = swiglu(x, moe.w_gate[...][e], moe.w_up[...][e], moe.w_down[...][e])
    y_ref = y_ref + out_e * jnp.sum(jnp.where((ex == e) & kept, weights, 0.0), -1)[..., None]
  np.testing.assert_allclose(y * mask[..., None], y_ref * mask[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cf,expected", [(0.0, S), (1.0, 12), (100.0, S)])
def test_capacity(cf, expected):
  cfg = MoEConfig(E, K, 0, F, cf, True)
  assert capacity(cfg, S) == expected
