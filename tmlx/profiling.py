"""Profiler traces of chosen training steps (`config.profile`), and a step marker around every step.

The trace is `jax.profiler`'s, written where TensorBoard's profile plugin (and XProf) look for it:
`<workdir>/profile/plugins/profile/<time>/<host>.xplane.pb` (with a `.trace.json.gz` beside it).
It starts before the first chosen step runs and stops once the last one has finished on the device,
so it holds exactly the chosen steps, each inside a `train` step marker (`StepTraceAnnotation`,
which the trace viewer and XProf's step-time views group by). The markers are there in every run:
a trace taken from outside (`jax.profiler.start_server`, TensorBoard's capture button) has them
too, and outside a trace they cost nothing measurable.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
from absl import logging

from tmlx import fields, paths


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  """`config.profile` (experiments/base.py says what each field does)."""

  start_step: int
  num_steps: int
  processes: str

  def __post_init__(self):
    fields.in_range(self, "start_step", 0)
    if self.start_step:
      fields.positive(self, "num_steps")
    processes(self.processes)

  @classmethod
  def from_config(cls, profile) -> ProfileConfig:
    return fields.build(cls, profile)


def processes(value: str) -> tuple[int, ...] | None:
  """`config.profile.processes` as indices: '0,2' → (0, 2), 'all' → None (every process);
  FieldError otherwise."""
  if value.strip() == "all":
    return None
  try:
    out = tuple(int(p) for p in value.split(",") if p.strip())
  except ValueError:
    out = ()
  if not out or any(p < 0 for p in out):
    raise fields.FieldError(
      f"@processes={fields.shown(value)}: expected 'all' or comma-separated process indices ≥ 0, e.g. '0,1'"
    )
  return out


class Profiler:
  """Call `step(step, state)` at the top of every loop iteration and `close()` after the loop."""

  def __init__(self, cfg: ProfileConfig, workdir: str, process_index: int):
    chosen = processes(cfg.processes)
    self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
    self.enabled = cfg.start_step > 0 and (chosen is None or process_index in chosen)
    self.directory = paths.join(workdir, "profile")
    self._tracing = False
    self._done = False
    self._marker = contextlib.ExitStack()

  def step(self, step: int, state) -> None:
    """Step `step` is about to run (`state` is the previous step's result)."""
    self._marker.close()
    if self._tracing and step > self.last:
      jax.block_until_ready(state)  # the last chosen step's device work belongs in the trace
      self._stop()
    if self.enabled and not self._done and self.first <= step <= self.last:
      self._done = True  # one window per run, even if this start fails
      try:
        paths.makedirs(self.directory)
        jax.profiler.start_trace(self.directory)
      except (RuntimeError, OSError) as e:  # a trace someone else started, an unwritable directory
        logging.warning("profiler: no trace of steps %d..%d (config.profile): %s", step, self.last, e)
      else:
        self._tracing = True
        logging.info("profiler: tracing steps %d..%d into %s", step, self.last, self.directory)
    self._marker.enter_context(jax.profiler.StepTraceAnnotation("train", step_num=step))

  def close(self) -> None:
    self._marker.close()
    if self._tracing:
      self._stop()

  def _stop(self) -> None:
    self._tracing = False
    jax.profiler.stop_trace()
    logging.info("profiler: trace written under %s", self.directory)
