"""Flow-matching audio head: loss and Euler sampler (MODEL_SPEC.md §4-§5).

Dimensions:
  D  model width
  U  flow-head width
  Y  flow-target values per position (W·M for the audio head)
  Z  flow-matching draws of (t, x0) per target
Leading dimensions (`*lead`: e.g. the batch and the targets of a row) pass through.

The head is a residual MLP with adaptive LayerNorm: condition y = Linear(h) + MLP(sin(t)); each
block computes LN(z)·(1 + scale) + shift → Linear → SiLU → Linear and adds it back through a
gate, with (shift, scale, gate) from Linear(SiLU(y)) initialized to zero.

The velocity is out(z) + skip(y) ⊙ x_t. On the OT path the true velocity is
(E[x1 | x_t, h] - (1 - σ)·x_t) / (1 - (1 - σ)·t): x_t itself, with a coefficient that depends on t
only, plus what the network infers. Without the skip the head must carry all Y values of x_t (the
noise) through its width U; at U < Y (320 mel values through 128 in the tiny configs) it cannot,
and it learns only the marginal distribution of the targets, ignoring h (its samples then err
twice as much as the per-channel mean). The skip, zero-initialized, passes x_t straight through.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Float32

from tmlx import fields
from tmlx.nn.common import Dense, Dtypes, layer_norm, scan_modules, stack_modules, zeros_init

TIME_FEATURES = 256
TSampling = Literal["logit_normal", "uniform"]
T_SAMPLINGS = get_args(TSampling)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  width: int
  depth: int
  num_draws: int
  t_sampling: TSampling
  sigma_min: float

  def __post_init__(self):
    fields.literals(self)
    fields.positive(self, "width", "depth", "num_draws")


def timestep_features(t: Float[Array, "*lead"], dim: int = TIME_FEATURES) -> Float32[Array, "*lead _"]:
  """Sinusoidal features of t ∈ [0, 1]: [...] → [..., dim]."""
  freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _AdaLNBlock(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs, dtypes: Dtypes):
    self.mod = Dense(width, 3 * width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True, init=zeros_init)
    self.fc1 = Dense(width, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.fc2 = Dense(width, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)

  def __call__(self, z: Float[Array, "*lead U"], y_act: Float[Array, "*#lead U"]) -> Float[Array, "*lead U"]:
    shift, scale, gate = jnp.split(self.mod(y_act), 3, axis=-1)
    u = layer_norm(z).astype(z.dtype) * (1 + scale) + shift
    return z + gate * self.fc2(jax.nn.silu(self.fc1(u)))


class FlowHead(nnx.Module):
  """Velocity v(x_t, t | h): x_t [..., Y], t [...], h [..., D] → [..., Y] (h broadcasts)."""

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

  def condition(self, h: Float[Array, "*#lead D"], t: Float[Array, "*#lead"]) -> Float[Array, "*lead U"]:
    """The conditioning vector y [..., U] (also what streaming parity compares)."""
    return self.cond(h) + self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t))))

  def __call__(
    self, x_t: Float[Array, "*lead Y"], t: Float[Array, "*lead"], h: Float[Array, "*#lead D"]
  ) -> Float32[Array, "*lead Y"]:
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


def flow_matching_loss(
  head: FlowHead, h: Float[Array, "*lead D"], x1: Float[Array, "*lead Y"], key: jax.Array
) -> Float32[Array, "*lead"]:
  """Per-target conditional flow-matching loss (OT path), averaged over draws.

  h [..., D] conditions and x1 [..., Y] targets in [-1, 1] → loss [...]. The Z draws of (t, x0)
  go on a new leading axis, [Z, ..., Y], so the leading axes of h (e.g. a sharded batch) stay in
  place.
  """
  cfg = head.cfg
  z = cfg.num_draws
  k_t, k_x = jax.random.split(key)
  t = sample_t(k_t, (z, *x1.shape[:-1]), cfg.t_sampling)
  x0 = jax.random.normal(k_x, (z, *x1.shape))
  x1 = x1.astype(jnp.float32)[None]
  s = 1.0 - cfg.sigma_min
  x_t = (1.0 - s * t[..., None]) * x0 + t[..., None] * x1
  target = x1 - s * x0
  v = head(x_t, t, h[None])
  return jnp.mean(jnp.square(v - target), axis=(0, -1))


def sample(
  head: FlowHead, h: Float[Array, "*lead D"], key: jax.Array, *, steps: int = 10, temperature: float = 1.0
) -> Float32[Array, "*lead Y"]:
  """Euler integration from x0 ~ N(0, τ²I) to t = 1: h [..., D] → x [..., Y] in [-1, 1]."""
  y = head.out.kernel.shape[-1]
  x = temperature * jax.random.normal(key, (*h.shape[:-1], y))
  dt = 1.0 / steps

  def step(x, i):
    t = jnp.full(h.shape[:-1], i * dt)
    return x + dt * head(x, t, h), None

  x, _ = jax.lax.scan(step, x, jnp.arange(steps, dtype=jnp.float32))
  return jnp.clip(x, -1.0, 1.0)
