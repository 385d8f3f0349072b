"""What a training job does about faults: a preemption notice (SIGTERM) acted on at a step that
every process agrees on, a watchdog for a peer that hangs, a limit on consecutive non-finite
steps, the bad-episode skip ratio of the data, and the background troubles (a failed save, a lost
workdir lock) that stop every process at once. `TrainConfig` is `config.train`: the run's length
and these limits."""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tmlx import checkpoint as checkpoint_lib
from tmlx import fields
from tmlx.checkpoint import Checkpointer
from tmlx.workdir_lock import WorkdirLock, WorkdirLockLostError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train` (experiments/base.py says what each field does)."""

  num_steps: int
  check_batches: bool
  max_consecutive_bad_steps: int
  step_timeout_s: int
  inject_nan_at_steps: str

  def __post_init__(self):
    fields.positive(self, "num_steps")
    fields.in_range(self, "max_consecutive_bad_steps", 0)
    fields.in_range(self, "step_timeout_s", 0)
    self.nan_steps  # noqa: B018 (checks the list)

  @property
  def nan_steps(self) -> tuple[int, ...]:
    """`inject_nan_at_steps` as step numbers ('3, 5,9' → (3, 5, 9))."""
    value = self.inject_nan_at_steps
    try:
      steps = tuple(int(part) for part in str(value).split(",") if part.strip())
    except ValueError:
      steps = (0,)
    if any(s < 1 for s in steps):
      raise fields.FieldError(
        f"@inject_nan_at_steps={fields.shown(value)}: expected comma-separated step numbers ≥ 1, e.g. '3,5'"
      )
    return steps

  @classmethod
  def from_config(cls, train) -> TrainConfig:
    return fields.build(cls, train)


def trouble(lock: WorkdirLock | None, ckpt: Checkpointer) -> Exception | None:
  """This process's reason to stop now: its lock was taken over, or a background save failed."""
  try:
    if lock is not None:
      lock.check()
    ckpt.check()
  except (WorkdirLockLostError, checkpoint_lib.CheckpointSaveError) as e:
    return e
  return None


class Preemption:
  """SIGTERM as a preemption notice, acted on at a step boundary that every process agrees on.

  Every process installs a SIGTERM handler that only sets a flag. `agreed()`, called by every
  process once per step at the same point, is True from the first step boundary at which any
  process has the flag: with several processes the flags are all-gathered (one small host
  collective per step, next to the data statistics' own, so it adds no wait for the device), so a
  notice that reaches one process stops all of them after the same step.

  JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`) is not used: its
  manager keeps one "current step" per process, and Orbax's CheckpointManager calls it too, from
  its finalize thread with the step it just saved. Such a stale call can make the agreed step one
  that every process has already passed, and the notice is then never acted on (reproduced with
  jax 0.10.2). `tmlx.runtime.distributed.initialize` turns that service off; until `run` installs this
  handler, SIGTERM ends a process as usual.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._notice)

  def _notice(self, signum, frame) -> None:
    if not self.requested:
      logging.warning("SIGTERM received: stopping at the next step boundary with a checkpoint")
    self.requested = True

  def agreed(self, trouble: bool = False) -> tuple[bool, bool]:
    """(whether any process has the notice, whether any process reports `trouble`)."""
    if jax.process_count() == 1:
      return self.requested, trouble
    flags = multihost_utils.process_allgather(np.array([self.requested, trouble], np.int32)).reshape(-1, 2)
    return bool(flags[:, 0].max()), bool(flags[:, 1].max())

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Watchdog:
  """Ends the process when `beat` is not called for `timeout_s` seconds.

  JAX's heartbeats catch a peer that died or stopped; a peer that is alive but never reaches the
  next collective (a wedged data loader, a deadlock) leaves the others blocked in it for ever.
  The loop beats once per step: if no beat comes in time, this logs the step it waited for and
  every thread's stack, and exits the process with status 1 (os._exit: the main thread may be
  blocked inside XLA); the other processes then fail through the heartbeat check.
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self._step = None
    self._last = time.monotonic()
    self._done = threading.Event()
    if timeout_s > 0:
      threading.Thread(target=self._watch, name="tmlx-watchdog", daemon=True).start()

  def beat(self, step: int) -> None:
    self._step, self._last = step, time.monotonic()

  def close(self) -> None:
    self._done.set()

  def _watch(self) -> None:
    while not self._done.wait(min(5.0, self.timeout_s / 4)):
      idle = time.monotonic() - self._last
      if idle > self.timeout_s:
        logging.error(
          "no progress for %.0f s while on step %s (config.train.step_timeout_s=%g): a peer process may be "
          "hung, or this one is; the stacks of every thread follow. Exiting.",
          idle,
          self._step,
          self.timeout_s,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(1)


class BadStepsError(RuntimeError):
  """More consecutive non-finite steps than `train.max_consecutive_bad_steps`."""


class BadSteps:
  """Counts steps whose update was skipped for a non-finite loss or gradient (`bad_step` flag),
  and raises BadStepsError after more than `limit` in a row."""

  def __init__(self, limit: int, on_bad=None):
    self.limit = limit
    self.on_bad = on_bad  # called with the number of each bad step (the goodput clock)
    self.total = 0
    self.consecutive = 0
    self.pending: tuple[int, jax.Array] | None = None  # (step, its device flag), not read yet

  def observe(self) -> None:
    if self.pending is None:
      return
    step, flag = self.pending
    self.pending = None
    if float(flag) == 0.0:
      self.consecutive = 0
      return
    self.total += 1
    self.consecutive += 1
    if self.on_bad is not None:
      self.on_bad(step)
    logging.warning(
      "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
      step,
      self.consecutive,
      self.total,
    )
    if self.consecutive > self.limit:
      raise BadStepsError(
        f"{self.consecutive} consecutive steps up to step {step} had a non-finite loss or gradient "
        f"(more than config.train.max_consecutive_bad_steps={self.limit}); the last good state is saved. "
        "Check the data and the learning rate, or lower it and resume."
      )


class DataStats:
  """Running counts of the windows packed and the bad episodes skipped per reason, over all
  processes; raises once the skipped fraction of draws passes `data.max_skip_ratio`."""

  MIN_DRAWS = 100

  def __init__(self, max_skip_ratio: float):
    self.max_skip_ratio = max_skip_ratio
    self.totals: dict[str, int] = {}

  def add(self, local: dict) -> None:
    keys = sorted(local)
    counts = np.array([int(local[k]) for k in keys], np.int64)
    if jax.process_count() > 1:
      counts = multihost_utils.process_allgather(counts).sum(axis=0)
    for k, v in zip(keys, counts):
      self.totals[k] = self.totals.get(k, 0) + int(v)
    skipped = self.skipped()
    draws = skipped + self.totals.get("windows", 0)
    if skipped and draws >= self.MIN_DRAWS and skipped / draws > self.max_skip_ratio:
      reasons = ", ".join(f"{k.removeprefix('skipped_')}: {v}" for k, v in self.totals.items() if k != "windows" and v)
      raise RuntimeError(
        f"data: {skipped} of {draws} episode draws were bad and skipped ({skipped / draws:.1%}), more than "
        f"config.data.max_skip_ratio={self.max_skip_ratio}; by reason: {reasons}. Rerun with "
        "--config.data.on_error=raise to see the first error in full."
      )

  def skipped(self) -> int:
    return sum(v for k, v in self.totals.items() if k != "windows")

  def metrics(self) -> dict[str, float]:
    out = {f"data/{k}": float(v) for k, v in self.totals.items() if k == "windows" or v}
    out["data/skipped"] = float(self.skipped())
    return out
