"""Models for inference from checkpoints: the checkpoint's own resolved config, its parameters
and router state (no optimizer state), on the devices the caller has."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from experiments import base
from tmlx import sharding
from tmlx.checkpoint import Checkpointer, open_existing
from tmlx.nn.model import InteractionModel
from tmlx.state import state_spec


def load_config(path: str, *, step: int | None = None) -> ml_collections.ConfigDict:
  """The resolved config saved with checkpoint `step` (default: the latest) under `path`."""
  ckpt = open_existing(path)
  try:
    return _saved_config(ckpt, ckpt.pick_step(step, path))[0]
  finally:
    ckpt.close()


def _saved_config(ckpt: Checkpointer, step: int) -> tuple[ml_collections.ConfigDict, int]:
  config = ml_collections.ConfigDict(ckpt.restore_config(step))
  # Inference settings added after the checkpoint was saved take their defaults.
  saved = config.get("stream", ml_collections.ConfigDict()).to_dict()
  config.stream = ml_collections.ConfigDict({**base.get_config().stream.to_dict(), **saved})
  return config, step


def load_model(
  path: str,
  *,
  step: int | None = None,
  devices: Sequence[jax.Device] | None = None,
  mesh: dict | None = None,
) -> tuple[InteractionModel, ml_collections.ConfigDict, int]:
  """(model, resolved config, step) of checkpoint `step` (default: the latest) under `path`.

  The model lives on `devices` (default: all) with the config's mesh if it fits them, else
  replicated (or on `mesh`, axis sizes, if given); the arrays are resharded on read and verified
  against their fingerprints."""
  ckpt = open_existing(path)
  try:
    config, step = _saved_config(ckpt, ckpt.pick_step(step, path))
    devices = list(jax.devices() if devices is None else devices)
    if mesh is not None:
      config.mesh.update(mesh)
    else:
      try:
        sharding.mesh_shape(config.mesh, len(devices))
      except sharding.ShardingError:  # the training mesh does not fit these devices: replicate
        config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
        config.mesh.dcn.update(data=1, fsdp=1, expert=1, tensor=1)
    m = sharding.make_mesh(config.mesh, devices)
    spec = state_spec(config, m, sharding.rules_table(config.mesh.rules))
    parts = ("params", "model_state")  # no optimizer state
    abstract = {
      part: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        getattr(spec.abstract, part),
        getattr(spec.shardings, part),
      )
      for part in parts
    }
    restored = ckpt.restore_parts(step, abstract)
  finally:
    ckpt.close()
  return nnx.merge(spec.graphdef, restored["params"], restored["model_state"]), config, step
