"""The train state: its structure (TrainState), how to build it abstractly, sharded and for real
(StateSpec), and where a run's first state comes from (`restore_or_init`).

Serving and evaluation import this module, not the trainer: building a model from a config needs
neither the training loop nor the data pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tmlx import checkpoint as checkpoint_lib
from tmlx import fields, sharding
from tmlx.checkpoint import Checkpointer
from tmlx.nn.model import InteractionModel, ModelConfig
from tmlx.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # pure dict of parameter arrays (nnx.to_pure_dict layout)
  model_state: dict  # non-gradient model variables (MoE balancing biases), same layout
  opt_state: Any


def new_model(cfg: ModelConfig, seed: int) -> InteractionModel:
  """A freshly initialized model (lazily sharded: shardings come from the logical names)."""
  with nnx.use_eager_sharding(False):
    return InteractionModel(cfg, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build the train state: abstractly, sharded, and for real."""

  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings
  init: Any  # () -> TrainState; run it under jax.jit(out_shardings=shardings)

  def target(self) -> TrainState:
    """The abstract state with its shardings: what a restore reads into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings)


def state_spec(config: ml_collections.ConfigDict, mesh, rules) -> StateSpec:
  """Abstract state via eval_shape, its shardings from the logical names, and the init function."""
  model_cfg = ModelConfig.from_config(config.model)
  # config.optimizer as it is: `tmlx.config.validate` checks it (OptimizerConfig), and fault drills
  # build a state with settings that validation would refuse (a NaN learning rate).
  tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  graphdef, abstract_params, abstract_rest = nnx.split(
    nnx.eval_shape(lambda: new_model(model_cfg, config.seed)), nnx.Param, ...
  )
  param_sh = sharding.state_shardings(abstract_params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def init() -> TrainState:
    _, params, rest = nnx.split(new_model(model_cfg, config.seed), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=rest, opt_state=tx.init(params))

  abstract = jax.eval_shape(init)
  shardings = TrainState(
    step=replicated,
    params=param_sh,
    model_state=sharding.state_shardings(abstract_rest, mesh, rules),
    opt_state=optax.tree_map_params(
      tx,
      lambda _, s: s,
      abstract.opt_state,
      param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding),
    ),
  )
  return StateSpec(graphdef=graphdef, tx=tx, schedule=schedule, abstract=abstract, shardings=shardings, init=init)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """`config.init`: where a run without checkpoints of its own starts (steps 2 and 3 below)."""

  resume_from: str
  params_from: str
  reinit: str

  def __post_init__(self):
    if self.reinit.strip() and not self.params_from:
      reinit = fields.shown(self.reinit)
      raise fields.FieldError(f"@reinit={reinit}: names parameters to initialize fresh, which needs @params_from")

  @property
  def reinit_prefixes(self) -> tuple[str, ...]:
    """`reinit` as parameter name prefixes ('text_head, text_embed' → two)."""
    return tuple(r.strip() for r in self.reinit.split(",") if r.strip())

  @classmethod
  def from_config(cls, init) -> InitConfig:
    return fields.build(cls, init)


# Restore precedence: a run's first state comes from the first of these that applies.
#   1. The latest checkpoint in `<workdir>/checkpoints` that is complete and whose arrays match
#      their fingerprints (a rerun or a preemption resume). A step that fails either check is
#      skipped with the reason logged, moved aside (`<step>.unusable-<time>`), and the one before
#      it is tried.
#   2. `config.init.resume_from`: the full state (step, parameters, optimizer) of another run's
#      latest usable checkpoint.
#   3. `config.init.params_from`: only the parameters of another run's latest checkpoint, with a
#      fresh optimizer. Parameters it lacks (or that `config.init.reinit` names) are initialized
#      and listed in the log; a parameter that grew in one dimension (more experts, a larger
#      vocabulary) gets the saved values first; any other shape change is an error naming it.
#   4. Scratch: a fresh, sharded initialization.
# Every restore targets the current mesh's shardings, so a checkpoint is resharded on read.
def restore_or_init(
  config: ml_collections.ConfigDict, spec: StateSpec, ckpt: Checkpointer
) -> tuple[TrainState, int | None]:
  """(first state of the run, the step of `ckpt` it resumed, None when it did not come from 1)."""
  init, target = InitConfig.from_config(config.init), spec.target()
  restored = ckpt.restore_latest(target, config=config.to_dict())
  if restored is not None:
    state, step = restored
    logging.info("resumed from checkpoint step %d in %s", step, ckpt.directory)
    return state, step
  elif init.resume_from:
    other = checkpoint_lib.open_existing(init.resume_from, "config.init.resume_from:")
    try:
      state, step = other.restore_latest(target, quarantine=False, config=config.to_dict())
    finally:
      other.close()
    logging.info("resumed from checkpoint step %d of %s (config.init.resume_from)", step, other.directory)
    return state, None
  elif init.params_from:
    return _params_from(init, spec, target), None
  else:
    logging.info("initialized from scratch")
    return jax.jit(spec.init, out_shardings=spec.shardings)(), None


def _params_from(init: InitConfig, spec: StateSpec, target: TrainState) -> TrainState:
  """Step 3 of the restore precedence: a fresh state with another run's parameters placed in it."""
  other = checkpoint_lib.open_existing(init.params_from, "config.init.params_from:")
  try:
    step = other.latest_step()
    loaded, fresh, unused = other.restore_params(step, target.params, init.reinit_prefixes)
  finally:
    other.close()
  state = jax.jit(spec.init, out_shardings=spec.shardings)()

  def place(path, leaf, sharding_):
    got = loaded.get(checkpoint_lib.leaf_name(("params",) + tuple(path)))
    if got is None:
      return leaf
    if got.shape == leaf.shape:
      return got
    axis = checkpoint_lib.grown_axis(got.shape, leaf.shape)  # more experts: saved first, new as initialized
    grow = jax.jit(lambda new, old: jax.lax.dynamic_update_slice_in_dim(new, old, 0, axis), out_shardings=sharding_)
    return grow(leaf, got)

  params = jax.tree.map_with_path(place, state.params, spec.shardings.params)
  logging.info(
    "parameters from checkpoint step %d of %s (config.init.params_from), fresh optimizer: %d restored; "
    "initialized fresh: %s; in the checkpoint but not in this model: %s",
    step,
    other.directory,
    len(loaded),
    fresh or "none",
    unused or "none",
  )
  return dataclasses.replace(state, params=params)
