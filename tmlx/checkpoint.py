"""Orbax checkpoints of the train state and the resolved config.

Restore precedence (what `restore_or_init` in tmlx.train does, in order):
  1. the latest complete checkpoint in `<workdir>/checkpoints` (a rerun or preemption resume);
  2. scratch: a fresh, sharded initialization.
A restore always targets the current mesh's shardings (the abstract state carries them), so a
checkpoint is resharded on read; restoring without target shardings is refused.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
  """Saves {state, config} into `directory` when asked (the train loop decides when), keeping the
  latest `keep`."""

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
      item_names=("state", "config"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, config: dict) -> None:
    """Starts a save of `state` (a pytree of global arrays) and the resolved `config`."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
      force=True,
    )

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    for path, leaf in jax.tree.leaves_with_path(abstract_state):
      if getattr(leaf, "sharding", None) is None:
        raise ValueError(
          f"refusing to restore {jax.tree_util.keystr(path)} without a target sharding: pass "
          "ShapeDtypeStructs with the current mesh's shardings"
        )
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out.state

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
