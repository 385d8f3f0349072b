"""Entry point: `python -m tmlx.main --config=experiments/sample_cpu.py --workdir=/tmp/run`.

Overrides go through the locked config: `--config.data.seq_len=512`; a misspelled key fails.
This is the only module of tmlx that reads flags.
"""

from __future__ import annotations

import atexit
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tmlx import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment file, e.g. experiments/sample_cpu.py (or experiments/sample_cpu.py:tiny).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
# A multi-process job on a machine no detector knows, or an override of the detected one
# (tmlx.runtime.cluster): all three of the first flags, or none.
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  "local_device_ids", None, "Devices of this process, as indices among the visible ones (default: detected)."
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keeps INFO chatter of Orbax's and the object-storage clients' internals (a line per file read
  from gs://) out of the training log (warnings still pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    quiet = ("/orbax/", "/gcsfs/", "/fsspec/")
    return record.levelno >= std_logging.WARNING or not any(q in record.pathname for q in quiet)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The goodput clock of this run segment, from the process's start; its last write is an exit
  # hook registered before JAX's own, so that it runs after them (hooks run last-in first-out).
  from tmlx import goodput

  recorder = goodput.Recorder(goodput.process_start_time())
  atexit.register(recorder.finish, at_exit=True)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = cli.load_config(_CONFIG)
  # Before JAX creates a backend: the experiment's row for this accelerator (mesh, XLA flags).
  from tmlx.runtime import accelerators

  accelerators.apply(config)
  if accelerators.detect() == "cpu" and not os.environ.get("JAX_PLATFORMS"):
    # No TPU or NVIDIA GPU here: do not let installed accelerator plugins (the test extras'
    # libtpu and CUDA plugin, for topology descriptions) try to start and print their failures.
    import jax

    jax.config.update("jax_platforms", "cpu")
  # Also before: fake CPU devices for single-machine runs.
  # In a multi-process job this is the device count of each process (see tmlx.runtime.cluster).
  if config.runtime.cpu_devices > 0:
    import jax

    jax.config.update("jax_num_cpu_devices", config.runtime.cpu_devices)

  # Also before any JAX computation: join a multi-process job if the flags or the environment describe one.
  from tmlx.runtime import cluster, distributed

  overrides = cluster.Overrides(
    coordinator_address=_COORDINATOR_ADDRESS.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    local_device_ids=_LOCAL_DEVICE_IDS.value,
  )
  try:
    with recorder.span("distributed_init"):
      distributed.initialize_from_env(overrides=overrides)
  except cluster.DistributedEnvError as e:
    logging.error("%s", e)
    sys.exit(f"invalid multi-process setup: {e}")

  import jax

  from tmlx import checkpoint, paths, train, workdir_lock
  from tmlx import config as config_lib

  try:
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    logging.error("%s", e)
    sys.exit(f"invalid config: {e}")
  workdir = _WORKDIR.value
  if paths.exists(workdir) and not paths.is_dir(workdir):
    sys.exit(f"--workdir={workdir}: exists and is not a directory")
  logging.info("workdir %s", paths.absolute(workdir))
  try:
    metrics = train.run(config, workdir, recorder)
  except (workdir_lock.WorkdirLockedError, checkpoint.IncompatibleCheckpointError, checkpoint.NoCheckpointError) as e:
    logging.error("%s", e)
    sys.exit(f"refused: {e}")
  except (checkpoint.CheckpointError, workdir_lock.WorkdirLockLostError) as e:  # a failed save, a lost lock, ...
    logging.error("%s", e)
    sys.exit(f"stopped: {e}")
  if metrics:
    logging.info("final: %s", {k: round(v, 5) for k, v in metrics.items()})


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
