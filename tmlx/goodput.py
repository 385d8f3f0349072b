"""Goodput: where the wall time of a training job went, over all its restarts.

Each run segment (one start of `python -m tmlx.main` on a workdir, until it exits) keeps a clock
that is always in exactly one bucket (`BUCKETS`): the trainer switches it as it goes from stage to
stage (`Recorder.enter`, `Recorder.span`), so every bucket is a sum of measured intervals and the
buckets of a segment add up to its wall time, from the process's start (read from the kernel, so
interpreter start-up and imports count) to its last write, from an exit hook (only the
interpreter's own teardown after that, about a second, is not counted). Process 0 writes its
segment as one JSON file, `<workdir>/goodput/<start ms>-<pid>.json`, rewritten whole (atomically on
a local disk; one object put on object storage, which cannot append) at each checkpoint save, at
most every WRITE_EVERY_S seconds between them, and last at exit. A segment that is killed
(SIGKILL, a lost machine) keeps what its last write held.

Steps lost to preemption are only known when a later segment restores an older step than an
earlier one reached: `summarize` finds them from the segments' restored steps and the step time
each recorded at its checkpoint saves, and moves their time from `productive` to
`lost_to_preemption` (and from the earlier segment's live range, so nothing is counted twice).

    python -m tmlx.goodput --workdir=WORKDIR [--json]

prints the buckets (seconds and % of wall time), the goodput (productive step time over wall time),
the steps lost and each segment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from absl import flags

from tmlx import cli, paths

# Every second of a segment is in one of these (the trainer switches between them):
BUCKETS = (
  "startup",  # process start to the training loop, outside the buckets below (imports, mesh, data, setup)
  "distributed_init",  # jax.distributed.initialize: joining the job (waiting for its other processes)
  "restore",  # restoring the state from a checkpoint, or initializing it
  "compile",  # compiling the train step (a persistent-cache hit loads it instead)
  "data_wait",  # the loop blocked on the input pipeline for the next batch
  "checkpoint",  # the loop blocked on a checkpoint save (async: the copy off the device), and the last saves' end
  "eval",  # duplex evaluations during training
  "profile",  # starting and stopping a profiler trace (config.profile)
  "productive",  # the rest of the training loop: steps whose update was applied
  "bad_steps",  # steps whose update was skipped (non-finite loss or gradient)
  "shutdown",  # after the loop: closing writers, the final log, until the process exits
)
# `summarize` adds this one, moved out of `productive`: steps a later segment trained again.
LOST = "lost_to_preemption"
WRITE_EVERY_S = 10.0
MAX_SAVES = 1000  # save points kept per segment (a restore far older than that is interpolated)
VERSION = 1


def process_start_time() -> float:
  """This process's start, in `time.time()` seconds: from the kernel's record of it (Linux), so
  that the interpreter's start and the imports before any tmlx code runs are counted; elsewhere,
  now."""
  now = time.time()
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, AttributeError):
    return now
  return now - age if 0 <= age < 86_400 else now


class Recorder:
  """The clock of one run segment. Created at process start (by tmlx.main, which passes the
  process's start time) or by `tmlx.train.run` when called from Python (the segment then starts
  at the call); it writes nothing until `attach` gives it a workdir (process 0 only)."""

  def __init__(self, process_start: float | None = None):
    now = time.time()
    self.process_start = now if process_start is None else min(process_start, now)
    self.seconds = dict.fromkeys(BUCKETS, 0.0)
    self.seconds["startup"] = now - self.process_start
    self._bucket = "startup"
    self._t = time.monotonic()
    self._dir: str | None = None
    self._path: str | None = None
    self._written = -float("inf")
    self._mark = 0.0  # productive seconds at the end of the previous step
    self._recent: dict[int, float] = {}  # step -> its seconds, for the last few steps
    self.facts: dict = {
      "start_step": None,  # the step restored (0: from scratch)
      "reached_step": None,  # the last step finished
      "bad_steps": 0,
      "step_s": 0.0,  # seconds of every step finished (productive + bad)
      "bad_step_s": 0.0,
      "saves": [],  # [step, step_s, bad_step_s] at each checkpoint save
      "outcome": "running",
      "compile_cache": {},
    }

  # -- the clock -----------------------------------------------------------------------------------

  def _close(self) -> None:
    now = time.monotonic()
    self.seconds[self._bucket] += now - self._t
    self._t = now

  def enter(self, bucket: str) -> str:
    """Switches the clock to `bucket`; returns the bucket it was in."""
    if bucket not in self.seconds:
      raise ValueError(f"unknown goodput bucket {bucket!r}; expected one of {BUCKETS}")
    self._close()
    previous, self._bucket = self._bucket, bucket
    return previous

  @contextlib.contextmanager
  def span(self, bucket: str) -> Iterator[None]:
    """The time inside the `with` block goes to `bucket`; the clock then returns to where it was."""
    previous = self.enter(bucket)
    try:
      yield
    finally:
      self.enter(previous)

  # -- what the trainer tells it -------------------------------------------------------------------

  def attach(self, workdir: str, *, write: bool) -> None:
    """From now on the segment is stored in `workdir` (if `write`: process 0)."""
    if not write:
      return
    self._dir = paths.join(workdir, "goodput")
    paths.makedirs(self._dir)
    self._path = paths.join(self._dir, f"{int(self.process_start * 1000):013d}-{os.getpid()}.json")
    self.write()

  def earlier_segments(self) -> list[dict]:
    """The records of the segments before this one in the same workdir (process 0; else [])."""
    if self._dir is None:
      return []
    return [r for r in read_records(self._dir) if r.get("file") != os.path.basename(self._path)]

  def restored(self, step: int) -> tuple[int, float]:
    """The run starts from `step` (0: from scratch); returns the steps (and their step seconds)
    that earlier segments in the workdir trained after it and that are now lost."""
    self.facts["start_step"] = self.facts["reached_step"] = int(step)
    self._recent.clear()
    earlier = self.earlier_segments()
    if not earlier:
      return 0, 0.0
    this = summarize([*earlier, self.record()]).segments[-1]
    return this["lost_steps"], this["lost_s"]

  def steps_begin(self) -> None:
    """The training loop starts: its time is productive unless a span says otherwise."""
    self.enter("productive")
    self._mark = self.seconds["productive"]

  def step_done(self, step: int) -> None:
    """Step `step` finished (dispatched, with the host work of its iteration)."""
    self._close()
    took = self.seconds["productive"] - self._mark
    self._mark = self.seconds["productive"]
    self._recent[step] = took
    for old in [s for s in self._recent if s < step - 8]:
      del self._recent[old]
    self.facts["reached_step"] = step
    self.facts["step_s"] += took
    if time.monotonic() - self._written >= WRITE_EVERY_S:
      self.write()

  def bad_step(self, step: int) -> None:
    """Step `step` had its update skipped: its time moves from productive to bad_steps."""
    took = self._recent.pop(step, 0.0)
    self._close()
    self.seconds["productive"] -= took
    self._mark -= took
    self.seconds["bad_steps"] += took
    self.facts["bad_steps"] += 1
    self.facts["bad_step_s"] += took

  def saved(self, step: int) -> None:
    """A checkpoint of `step` was started: what a later segment that restores it loses is the step
    time after this point."""
    saves = self.facts["saves"]
    saves.append([int(step), self.facts["step_s"], self.facts["bad_step_s"]])
    del saves[:-MAX_SAVES]
    self.write()

  def ended_by(self, outcome: str) -> None:
    """Why the segment ends ('completed', 'preempted at step N', 'stopped: Error'); the first
    reason given is kept."""
    if self.facts["outcome"] == "running":
      self.facts["outcome"] = outcome

  def compile_cache(self, **info) -> None:
    self.facts["compile_cache"].update(info)

  # -- storage -------------------------------------------------------------------------------------

  def record(self, *, ended: bool = False) -> dict:
    self._close()
    return {
      "version": VERSION,
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "process_start": self.process_start,
      # The segment's clock, not time.time(): the wall clock may be slewed meanwhile, and the
      # buckets must add up to updated - process_start exactly.
      "updated": self.process_start + sum(self.seconds.values()),
      "ended": ended,
      "seconds": dict(self.seconds),
      **self.facts,
    }

  def write(self, *, ended: bool = False) -> None:
    if self._path is None:
      return
    self._written = time.monotonic()
    try:
      _write_json(self._path, self.record(ended=ended))
    except Exception as e:  # noqa: BLE001 - the log must never stop training, whatever its store raises
      from absl import logging

      logging.warning("goodput: could not write %s: %s", self._path, e)

  def finish(self, *, at_exit: bool = False) -> None:
    """The last write of the segment. tmlx.train.run calls it when training ends; tmlx.main calls
    it again from an exit hook (`at_exit`), as late as it can, to count the shutdown too, except on
    an object store, whose client may be closed by then: there the record train.run wrote stays."""
    if at_exit and self._path is not None and paths.is_remote(self._path):
      return
    self.write(ended=True)


def _write_json(path: str, record: dict) -> None:
  """One whole file per write: a reader sees the old record or the new one, never a mix."""
  text = json.dumps(record, indent=1, sort_keys=True) + "\n"
  if paths.is_remote(path):
    paths.write_text(path, text)  # one object put
    return
  tmp = f"{path}.tmp"
  paths.write_text(tmp, text)
  os.replace(tmp, path)


def read_records(directory: str) -> list[dict]:
  """Every segment record in `directory` (<workdir>/goodput), oldest first; unreadable files are
  skipped (a write cut by a kill leaves only its `.tmp`)."""
  out = []
  for name in paths.listdir(directory):
    if not name.endswith(".json"):
      continue
    try:
      record = json.loads(paths.read_text(paths.join(directory, name)))
    except (OSError, ValueError):
      continue
    if isinstance(record, dict) and record.get("version") == VERSION:
      out.append({**record, "file": name})
  return sorted(out, key=lambda r: (r["process_start"], r["pid"]))


# -- the summary -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
  wall_s: float  # sum over segments of (last write - process start)
  seconds: dict[str, float]  # BUCKETS and LOST, over all segments
  goodput: float  # productive / wall
  lost_steps: int
  bad_steps: int
  downtime_s: float  # between one segment's end and the next one's start (not in wall_s)
  segments: list[dict]  # per segment: file, start/restored/reached steps, wall, lost, outcome, cache


def _step_time_at(record: dict, step: int) -> tuple[float, float]:
  """(step seconds, bad-step seconds) the segment had spent when it finished `step`: exact at its
  restored step, its save points and its last step; interpolated in between."""
  points = [(record["start_step"], 0.0, 0.0)]
  points += [tuple(p) for p in record.get("saves", ())]
  points.append((record["reached_step"], record.get("step_s", 0.0), record.get("bad_step_s", 0.0)))
  points = sorted(set(points))
  if step <= points[0][0]:
    return points[0][1], points[0][2]
  for (s0, a0, b0), (s1, a1, b1) in zip(points, points[1:]):
    if s0 <= step <= s1:
      f = 0.0 if s1 == s0 else (step - s0) / (s1 - s0)
      return a0 + f * (a1 - a0), b0 + f * (b1 - b0)
  return points[-1][1], points[-1][2]


def summarize(records: list[dict]) -> Summary:
  """The job's buckets over `records` (oldest first), with the steps lost to preemption: when a
  segment restores step r, the steps after r that earlier segments had trained (and not yet been
  counted lost) are lost, with the step time they took (bad steps among them stay bad)."""
  seconds = dict.fromkeys((*BUCKETS, LOST), 0.0)
  live: dict[int, int] = {}  # record index -> last step of it not (yet) lost
  segments = []
  lost_steps = bad_steps = 0
  downtime = 0.0
  for i, r in enumerate(records):
    for k, v in r["seconds"].items():
      seconds[k] = seconds.get(k, 0.0) + v
    bad_steps += r.get("bad_steps", 0)
    seg_lost_steps, seg_lost_s = 0, 0.0
    restored = r.get("start_step")
    if restored is not None:
      for j, end in list(live.items()):
        earlier = records[j]
        low = max(restored, earlier["start_step"])
        if end <= low:
          continue
        (a_end, b_end), (a_low, b_low) = _step_time_at(earlier, end), _step_time_at(earlier, low)
        seg_lost_steps += end - low
        seg_lost_s += max(0.0, (a_end - a_low) - (b_end - b_low))
        live[j] = low
      if r.get("reached_step") is not None:
        live[i] = r["reached_step"]
    seconds["productive"] -= seg_lost_s
    seconds[LOST] += seg_lost_s
    lost_steps += seg_lost_steps
    wall = r["updated"] - r["process_start"]
    if i:
      downtime += max(0.0, r["process_start"] - records[i - 1]["updated"])
    segments.append(
      {
        "file": r.get("file", ""),
        "process_start": r["process_start"],
        "wall_s": wall,
        "restored_step": restored,
        "reached_step": r.get("reached_step"),
        "lost_steps": seg_lost_steps,
        "lost_s": seg_lost_s,
        "outcome": r.get("outcome", "?") if r.get("ended") else f"{r.get('outcome', '?')} (no final write: killed?)",
        "compile_s": r["seconds"].get("compile", 0.0),
        "compile_cache": r.get("compile_cache", {}),
      }
    )
  wall = sum(s["wall_s"] for s in segments)
  return Summary(
    wall_s=wall,
    seconds=seconds,
    goodput=seconds["productive"] / wall if wall > 0 else 0.0,
    lost_steps=lost_steps,
    bad_steps=bad_steps,
    downtime_s=downtime,
    segments=segments,
  )


def report(summary: Summary, where: str = "") -> str:
  """The summary as a table, for people."""
  s = summary
  lines = [f"goodput{' of ' + where if where else ''}: {len(s.segments)} segment(s), wall time {s.wall_s:.1f} s"]
  lines.append(f"  {'bucket':<20} {'seconds':>10} {'% wall':>8}")
  for name, sec in s.seconds.items():
    share = 100 * sec / s.wall_s if s.wall_s > 0 else 0.0
    steps = {LOST: s.lost_steps, "bad_steps": s.bad_steps}.get(name)
    extra = "" if steps is None else f"  ({steps} step(s))"
    lines.append(f"  {name:<20} {sec:>10.2f} {share:>7.1f}%{extra}")
  lines.append(f"  {'total':<20} {sum(s.seconds.values()):>10.2f} {100.0 if s.wall_s > 0 else 0.0:>7.1f}%")
  lines.append(
    f"goodput {100 * s.goodput:.1f}% (productive step time / wall time); {s.lost_steps} step(s) lost to "
    f"preemption, {s.bad_steps} bad; {s.downtime_s:.1f} s between segments (not in the wall time)"
  )
  for seg in s.segments:
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seg["process_start"]))
    cache = seg["compile_cache"]
    hit = {True: ", compile cache hit", False: ", compile cache miss"}.get(cache.get("train_step_hit"), "")
    lines.append(
      f"  segment {start}: steps {seg['restored_step']}..{seg['reached_step']}, {seg['wall_s']:.1f} s, "
      f"compile {seg['compile_s']:.1f} s{hit}, {seg['lost_steps']} earlier step(s) lost; {seg['outcome']}"
    )
  return "\n".join(lines)


def summarize_workdir(workdir: str) -> Summary:
  """The summary of every segment recorded in `workdir` (its goodput/ folder); SystemExit naming
  the workdir when it holds none."""
  records = read_records(paths.join(workdir, "goodput"))
  if not records:
    raise SystemExit(f"{workdir}: no goodput records (goodput/*.json); is it a training workdir?")
  return summarize(records)


# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m tmlx.goodput"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "workdir", None, "The run's workdir (its goodput/ folder is read).", required=True, flag_values=fv
  )
  flags.DEFINE_bool("json", False, "Print the summary as JSON.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """Prints the summary of the workdir the parsed command line names (`summarize_workdir`)."""
  if args:
    cli.fail(PROG, f"takes no positional arguments; got {args}")
  with cli.one_line_exits(PROG):
    summary = summarize_workdir(fv.workdir)
  if fv.json:
    json.dump(dataclasses.asdict(summary), sys.stdout, indent=1)
    print()
  else:
    print(report(summary, fv.workdir))
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs `python -m tmlx.goodput ARGS` in this process on `argv` (ARGS; default sys.argv[1:]);
  returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run)
