"""Training metrics on the host: the writers (JSONL and TensorBoard events in the workdir, a local
directory or an object-store URL, `tmlx.paths`) and the progress line, of which only process 0
writes (on other processes every method is a no-op); and what the loop derives from a step's
device metrics (`host_metrics`, `throughput`, `warn_about`, `row_digests`). `LoggingConfig` is
`config.logging`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib

import jax
import ml_collections
import numpy as np
from absl import logging

from tmlx import fields, flops, paths

FLUSH_S = 30.0  # object storage: the longest a logged row waits in memory (checkpoints flush sooner)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """`config.logging` (experiments/base.py says what each field does)."""

  every: int
  tensorboard: bool
  row_digests: bool

  def __post_init__(self):
    fields.positive(self, "every")


class MetricWriter:
  """Writes `{step, **scalars}` to `<workdir>/metrics.jsonl` and TensorBoard event files.

  A run that resumes from `start_step` keeps the rows of steps up to it and drops later ones (and a
  line cut by a kill): the steps it trains again log them again, so after any number of kills and
  resumes every step has one row. On a local disk rows are appended one line at a time. Object
  storage cannot append (an append silently overwrites), so there the rows are held in memory and
  `flush` rewrites the whole object: the train loop flushes before each checkpoint save, so the
  rows a checkpoint covers are stored before the checkpoint can exist; `write` flushes at most every
  FLUSH_S seconds, and `close` at the end. A crash loses at most the rows since the last flush,
  which belong to steps after the last checkpoint, which the resumed run logs again.
  """

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool | None = None, start_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self._rows: list[str] | None = None  # object storage: every row of the file, rewritten on flush
    self._flushed = time.monotonic()
    if not self.enabled:
      return
    paths.makedirs(workdir)
    self._path = paths.join(workdir, "metrics.jsonl")
    kept, changed = _kept_rows(self._path, start_step)
    if paths.is_remote(workdir):
      self._rows = kept
      if changed:
        self.flush()
    else:
      if changed:  # replaced whole, so that a kill now leaves the old file or the new one
        tmp = self._path + ".tmp"
        paths.write_text(tmp, "".join(kept))
        os.replace(tmp, self._path)
      self._jsonl = open(self._path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float], arrays: dict[str, np.ndarray] | None = None) -> None:
    """Scalars, plus arrays (e.g. expert load [L, E]: nested lists in JSONL, one histogram per row
    in TensorBoard)."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    lists = {k: np.asarray(v).tolist() for k, v in (arrays or {}).items()}
    line = json.dumps({"step": step, **clean, **lists}, allow_nan=True) + "\n"
    if self._rows is not None:
      self._rows.append(line)
      if time.monotonic() - self._flushed >= FLUSH_S:
        self.flush()
    else:
      self._jsonl.write(line)
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      for k, v in (arrays or {}).items():
        for i, row in enumerate(np.asarray(v).reshape(-1, np.shape(v)[-1])):
          self._tb.add_histogram(f"{k}/layer_{i}", row, step)

  def flush(self) -> None:
    """Stores every row written so far (and the TensorBoard events)."""
    if not self.enabled:
      return
    if self._rows is not None:
      paths.write_text(self._path, "".join(self._rows))
      self._flushed = time.monotonic()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._rows is not None:
      self.flush()
      self._rows = None
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _kept_rows(path: str, start_step: int | None) -> tuple[list[str], bool]:
  """The lines of an existing metrics file that a run resuming from `start_step` keeps (all when
  None), and whether any was dropped."""
  try:
    text = paths.read_text(path)
  except FileNotFoundError:
    return [], False
  lines = text.splitlines(keepends=True)
  if start_step is None:
    return lines, False
  kept = []
  for line in lines:
    try:
      complete = line.endswith("\n") and json.loads(line)["step"] <= start_step
    except (ValueError, KeyError, TypeError):  # cut by a kill, or not a row
      complete = False
    if complete:
      kept.append(line)
  return kept, len(kept) != len(lines)


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


def row_digests(batch: dict) -> str:
  """'row:crc32 ...' of the global batch rows held by this process's devices (all fields, in
  name order), so that the rows of different runs can be compared from their logs."""
  crcs: dict[int, int] = {}
  for name in sorted(batch):
    seen = set()
    for shard in batch[name].addressable_shards:
      first = shard.index[0].indices(batch[name].shape[0])[0]
      if first in seen:
        continue  # the same rows on another device (replicated over a non-batch axis)
      seen.add(first)
      data = np.asarray(shard.data)
      for i in range(data.shape[0]):
        crcs[first + i] = zlib.crc32(np.ascontiguousarray(data[i]).tobytes(), crcs.get(first + i, 0))
  return " ".join(f"{r}:{crcs[r]:08x}" for r in sorted(crcs))


def host_metrics(raw: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Device metrics → scalars (per-layer arrays become one scalar per layer) and arrays."""
  scalars: dict[str, float] = {}
  arrays: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    value = np.asarray(value)
    if value.ndim == 0:
      scalars[key] = float(value)
    elif value.ndim == 1:
      scalars.update({f"{key}/layer_{i}": float(v) for i, v in enumerate(value)})
    else:  # expert load [L, E]: keep it whole, and its max and min relative to the mean
      arrays[key] = value
      relative = value * value.shape[-1]
      for i in range(value.shape[0]):
        scalars[f"moe/max_load/layer_{i}"] = float(relative[i].max())
        scalars[f"moe/min_load/layer_{i}"] = float(relative[i].min())
      scalars["moe_max_load"] = float(relative.max())
  return scalars, arrays


def throughput(positions_per_s: float, flops_per_pos: float, peak: float | None) -> dict[str, float]:
  devices = jax.device_count()
  out = {"model_tflops_per_device": flops_per_pos * positions_per_s / devices / 1e12}
  if peak is not None:
    out["mfu"] = flops.mfu(flops_per_pos, positions_per_s, devices, peak)
  return out


def warn_about(step: int, m: dict[str, float], config: ml_collections.ConfigDict) -> None:
  """Warnings for logged metrics that mean training sees less than the data holds."""
  drop_warn = config.model.moe.drop_warn_fraction
  if m["moe_dropped_fraction"] > drop_warn:
    logging.warning(
      "step %d: MoE dropped %.1f%% of routed assignments (above config.model.moe.drop_warn_fraction=%g)",
      step,
      100 * m["moe_dropped_fraction"],
      drop_warn,
    )
  if m["text_targets_overflow"] or m["audio_targets_overflow"]:
    logging.warning(
      "step %d: %d text / %d audio targets beyond config.loss.max_*_target_fraction were not trained on",
      step,
      m["text_targets_overflow"],
      m["audio_targets_overflow"],
    )
