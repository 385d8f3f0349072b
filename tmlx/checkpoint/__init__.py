"""Orbax checkpoints: the train state, the resolved config and a metadata record, with integrity
checks.

Where a run's first state comes from (its workdir's checkpoints, another run's, or scratch) is
`tmlx.state.restore_or_init`, with the order written above it. A restore always targets the
current mesh's shardings (the abstract state carries them), so a checkpoint is resharded on read;
restoring without target shardings is refused.

Items of a checkpoint step (no pickle anywhere):
  state   the TrainState arrays (Orbax PyTree item: tensorstore OCDBT, uncompressed)
  config  the resolved config (JSON)
  meta    JSON: tmlx version, step, mesh shape, process count, data position (step, seed and
          data-spec hash) and a fingerprint per array
A fingerprint is two wrapping uint32 sums over the array's bit patterns, one of them weighted by
element index: integer sums do not depend on the reduction order, so the fingerprint of an array
is the same on every mesh and process count, and any changed element changes it.

Modules: `manager` (the Checkpointer and its errors), `fingerprint`, `handlers` (how Orbax writes
a step), `report` (what `inspect` prints).
Inspect a checkpoint directory:  python -m tmlx.checkpoint inspect PATH [--step=N] [--verify]
"""

from tmlx.checkpoint.fingerprint import fingerprints, fingerprints_async, leaf_name
from tmlx.checkpoint.handlers import REPLICA_PARALLEL_MIN_SLICE_BYTES
from tmlx.checkpoint.manager import (
  CheckpointConfig,
  Checkpointer,
  CheckpointError,
  CheckpointSaveError,
  IncompatibleCheckpointError,
  NoCheckpointError,
  checkpoint_dir,
  config_differences,
  grown_axis,
  open_existing,
  quarantined,
  verify,
)
from tmlx.checkpoint.report import inspect

__all__ = [
  "REPLICA_PARALLEL_MIN_SLICE_BYTES",
  "CheckpointConfig",
  "CheckpointError",
  "CheckpointSaveError",
  "Checkpointer",
  "IncompatibleCheckpointError",
  "NoCheckpointError",
  "checkpoint_dir",
  "config_differences",
  "fingerprints",
  "fingerprints_async",
  "grown_axis",
  "inspect",
  "leaf_name",
  "open_existing",
  "quarantined",
  "verify",
]
