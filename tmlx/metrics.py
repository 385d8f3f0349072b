"""Metric writers: JSONL and TensorBoard events in the workdir, plus a progress line.

Only process 0 writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging


class MetricWriter:
  """Writes `{step, **scalars}` to `<workdir>/metrics.jsonl` and TensorBoard event files."""

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float], arrays: dict[str, np.ndarray] | None = None) -> None:
    """Scalars, plus arrays (e.g. expert load [L, E]: nested lists in JSONL, one histogram per row
    in TensorBoard)."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    lists = {k: np.asarray(v).tolist() for k, v in (arrays or {}).items()}
    self._jsonl.write(json.dumps({"step": step, **clean, **lists}, allow_nan=True) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      for k, v in (arrays or {}).items():
        for i, row in enumerate(np.asarray(v).reshape(-1, np.shape(v)[-1])):
          self._tb.add_histogram(f"{k}/layer_{i}", row, step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A one-line progress report with throughput and ETA, on process 0."""

  def __init__(self, first_step: int, num_steps: int):
    self.first_step, self.num_steps = first_step, num_steps
    self.t0 = time.perf_counter()

  def line(self, step: int, scalars: dict[str, float]) -> str:
    done = step - self.first_step
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / done * (self.num_steps - step) if done > 0 else math.nan
    keys = ("loss", "text_loss", "flow_loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu")
    parts = [f"{k}={scalars[k]:.4g}" for k in keys if k in scalars]
    return f"step {step}/{self.num_steps} " + " ".join(parts) + f" eta={_fmt(eta)}"

  def log(self, step: int, scalars: dict[str, float]) -> None:
    if jax.process_index() == 0:
      logging.info("%s", self.line(step, scalars))


def _fmt(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  return f"{m}m{s:02d}s"
