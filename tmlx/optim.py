"""The optimizer from `config.optimizer`: AdamW, warmup + cosine decay, global-norm clipping.

The functions read their settings by attribute, from an OptimizerConfig or `config.optimizer`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tmlx import fields


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """`config.optimizer` (experiments/base.py says what each field does)."""

  learning_rate: float
  warmup_steps: int
  final_lr_fraction: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float
  grad_accum_steps: int

  def __post_init__(self):
    fields.positive(self, "learning_rate", "grad_accum_steps")
    fields.in_range(self, "final_lr_fraction", 0.0, 1.0)
    fields.in_range(self, "b1", 0.0, 1.0, high_open=True)
    fields.in_range(self, "b2", 0.0, 1.0, high_open=True)
    for name in ("warmup_steps", "eps", "weight_decay"):
      fields.in_range(self, name, 0)

  @classmethod
  def from_config(cls, optimizer) -> OptimizerConfig:
    return fields.build(cls, optimizer)


def learning_rate_schedule(opt_config: OptimizerConfig | ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `final_lr_fraction` of it at `num_steps`.

  Update i (0-based) of the warmup uses peak·(i+1)/(warmup+1): no update is wasted at rate 0.
  """
  peak = opt_config.learning_rate
  warmup = min(opt_config.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=peak / (warmup + 1),
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=peak * opt_config.final_lr_fraction,
  )


NO_DECAY = ("scale", "bias")


def _decay_mask(params):
  """Weight decay on matrices and tables, not on norm scales or biases (by name: scanned layers
  give those a leading axis too, so their rank does not tell)."""

  def decay(path, p):
    return p.ndim >= 2 and str(getattr(path[-1], "key", "")) not in NO_DECAY

  return jax.tree.map_with_path(decay, params)


def clip_by_global_norm(grads, norm: jax.Array, max_norm: float):
  """Scales `grads` down to global norm `max_norm` (≤ 0 disables). The train step passes the norm
  it already computed for its metrics, so the gradients are reduced once, not twice."""
  if max_norm <= 0:
    return grads
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def make_optimizer(
  opt_config: OptimizerConfig | ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on the schedule. Global-norm clipping (opt_config.clip_norm) happens in the train step,
  before this transformation, with `clip_by_global_norm`."""
  schedule = learning_rate_schedule(opt_config, num_steps)
  tx = optax.adamw(
    schedule,
    b1=opt_config.b1,
    b2=opt_config.b2,
    eps=opt_config.eps,
    weight_decay=opt_config.weight_decay,
    mask=_decay_mask,
  )
  return tx, schedule
