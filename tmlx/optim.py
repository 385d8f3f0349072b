"""The optimizer from `config.optimizer`: AdamW, warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
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


def make_optimizer(opt_config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(opt_config, num_steps)
  parts = []
  if opt_config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      eps=opt_config.eps,
      weight_decay=opt_config.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts), schedule
