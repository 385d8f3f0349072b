"""Flow-matching audio head: loss and Euler sampler (MODEL_SPEC.md §4-§5).

Dimensions: D model, W head width, M = F·80 mel values per AUDIO_OUT position, R draws of
(t, x0) per target; leading dimensions (e.g. B batch, A targets per row) pass through.

The head is a residual MLP with adaptive LayerNorm: condition y = Linear(h) + MLP(sin(t)); each
block computes LN(z)·(1 + scale) + shift → Linear → SiLU → Linear and adds it back through a
gate, with (shift, scale, gate) from Linear(SiLU(y)) initialized to zero.

The velocity is out(z) + skip(y) ⊙ x_t. On the OT path the true velocity is
(E[x1 | x_t, h] - (1 - σ)·x_t) / (1 - (1 - σ)·t): x_t itself, with a coefficient that depends on t
only, plus what the network infers. Without the skip the head must carry all M values of x_t (the
noise) through its width W; at W < M (320 mel values through 128 in the tiny configs) it cannot,
and it learns only the marginal distribution of the targets, ignoring h (its samples then err
twice as much as the per-channel mean). The skip, zero-initialized, passes x_t straight through.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tmlx.nn.common import Dense, Dtypes, layer_norm, scan_modules, stack_modules, zeros_init

TIME_FEATURES = 256
T_SAMPLINGS = ("logit_normal", "uniform")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  width: int
  depth: int
  num_draws: int
  t_sampling: str  # one of T_SAMPLINGS
  sigma_min: float


def timestep_features(t: jax.Array, dim: int = TIME_FEATURES) -> jax.Array:
  """Sinusoidal features of t ∈ [0, 1]: [...] → [..., dim]."""
  freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _AdaLNBlock(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs, dtypes: Dtypes):
    self.mod = Dense(width, 3 * width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True, init=zeros_init)
    self.fc1 = Dense(width, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.fc2 = Dense(width, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)

  def __call__(self, z: jax.Array, y_act: jax.Array) -> jax.Array:
    shift, scale, gate = jnp.split(self.mod(y_act), 3, axis=-1)
    u = layer_norm(z).astype(z.dtype) * (1 + scale) + shift
    return z + gate * self.fc2(jax.nn.silu(self.fc1(u)))


class FlowHead(nnx.Module):
  """Velocity v(x_t, t | h): x_t [..., M], t [...], h [..., D] → [..., M] (h broadcasts)."""

  def __init__(self, d_model: int, mel_dim: int, cfg: FlowConfig, *, rngs: nnx.Rngs, dtypes: Dtypes):
    w = cfg.width
    self.cfg = cfg
    self.dtypes = dtypes
    self.cond = Dense(d_model, w, ("embed", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.t_fc1 = Dense(TIME_FEATURES, w, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.t_fc2 = Dense(w, w, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.x_in = Dense(mel_dim, w, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.blocks = stack_modules(lambda r: _AdaLNBlock(w, rngs=r, dtypes=dtypes), cfg.depth, rngs)
    self.final_mod = Dense(w, 2 * w, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True, init=zeros_init)
    self.out = Dense(w, mel_dim, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.skip = Dense(w, mel_dim, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True, init=zeros_init)

  def condition(self, h: jax.Array, t: jax.Array) -> jax.Array:
    """The conditioning vector y [..., W] (also what streaming parity compares)."""
    return self.cond(h) + self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t))))

  def __call__(self, x_t: jax.Array, t: jax.Array, h: jax.Array) -> jax.Array:
    y_act = jax.nn.silu(self.condition(h, t))
    z = self.x_in(x_t)
    z, _ = scan_modules(self.blocks, lambda blk, c: (blk(c, y_act), None), z)
    shift, scale = jnp.split(self.final_mod(y_act), 2, axis=-1)
    z = layer_norm(z).astype(z.dtype) * (1 + scale) + shift
    return (self.out(z) + self.skip(y_act) * x_t.astype(z.dtype)).astype(jnp.float32)


def sample_t(key: jax.Array, shape, how: str) -> jax.Array:
  if how == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(key, shape))
  if how == "uniform":
    return jax.random.uniform(key, shape)
  raise ValueError(f"flow t_sampling={how!r}: expected one of {T_SAMPLINGS}")


def flow_matching_loss(head: FlowHead, h: jax.Array, x1: jax.Array, key: jax.Array) -> jax.Array:
  """Per-target conditional flow-matching loss (OT path), averaged over draws.

  h [..., D] conditions and x1 [..., M] targets in [-1, 1] → loss [...]. The R draws of (t, x0)
  go on a new leading axis, so the leading axes of h (e.g. a sharded batch) stay in place.
  """
  cfg = head.cfg
  r = cfg.num_draws
  k_t, k_x = jax.random.split(key)
  t = sample_t(k_t, (r, *x1.shape[:-1]), cfg.t_sampling)
  x0 = jax.random.normal(k_x, (r, *x1.shape))
  x1 = x1.astype(jnp.float32)[None]
  s = 1.0 - cfg.sigma_min
  x_t = (1.0 - s * t[..., None]) * x0 + t[..., None] * x1
  target = x1 - s * x0
  v = head(x_t, t, h[None])
  return jnp.mean(jnp.square(v - target), axis=(0, -1))


def sample(head: FlowHead, h: jax.Array, key: jax.Array, *, steps: int = 10, temperature: float = 1.0) -> jax.Array:
  """Euler integration from x0 ~ N(0, τ²I) to t = 1: h [..., D] → x [..., M] in [-1, 1]."""
  m = head.out.kernel.shape[-1]
  x = temperature * jax.random.normal(key, (*h.shape[:-1], m))
  dt = 1.0 / steps

  def step(x, i):
    t = jnp.full(h.shape[:-1], i * dt)
    return x + dt * head(x, t, h), None

  x, _ = jax.lax.scan(step, x, jnp.arange(steps, dtype=jnp.float32))
  return jnp.clip(x, -1.0, 1.0)
