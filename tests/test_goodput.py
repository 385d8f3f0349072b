"""Profiles, goodput and the persistent compilation cache.

One job through `python -m tmlx.main` (module fixture `preempted_job`): a tiny run with a profiler
trace of steps 2-3 and no checkpoints is SIGTERMed after step 5 or so and resumed to the end (from
scratch: every step it had trained is lost). Its trace, its goodput log and its compilation cache
are then checked against what the test saw from outside. The accounting rules themselves are
checked on hand-made records and a fake clock.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import ml_collections
import pytest

from tests.helpers import ROOT, tiny_config
from tests.test_faults import N, Run, _preempted_at
from tmlx import compile_cache, goodput
from tmlx import config as config_lib

TOLERANCE = 0.05  # the acceptance bound: buckets vs wall time


@pytest.fixture(scope="module")
def preempted_job(tmp_path_factory):
  """(workdir, [(log, time.time() before starting it, after it ended)] of both segments)."""
  tmp = tmp_path_factory.mktemp("goodput")
  work = tmp / "work"
  common = ("--config.checkpoint.every=0",)
  segments = []
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the default: the workdir's own cache
    t0 = time.time()
    run = Run(work, tmp / "run1.log", {}, *common, "--config.profile.start_step=2", "--config.profile.num_steps=2")
    try:
      run.wait_for_log("step 5/8", 240)
      run.proc.send_signal(signal.SIGTERM)
      assert run.wait(60) == 0, run.log[-3000:]
      segments.append((run.log, t0, time.time()))
      t0 = time.time()
      run = Run(work, tmp / "run2.log", {}, *common)
      assert run.wait(240) == 0, run.log[-3000:]
      segments.append((run.log, t0, time.time()))
    finally:
      run.kill()
  return work, segments


def test_profile_traces_the_chosen_steps_with_step_markers(preempted_job):
  work, _ = preempted_job
  runs = sorted((work / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1, runs  # one trace: the resumed segment had no profile window
  names = sorted(p.name for p in runs[0].iterdir())
  assert any(n.endswith(".xplane.pb") for n in names), names
  (trace,) = [runs[0] / n for n in names if n.endswith(".trace.json.gz")]
  events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
  steps = {int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})}
  assert steps == {2, 3}, steps


def test_goodput_buckets_add_up_to_the_wall_time_and_count_the_lost_steps(preempted_job):
  work, segments = preempted_job
  records = goodput.read_records(str(work / "goodput"))
  assert len(records) == 2 and all(r["ended"] for r in records), records
  summary = goodput.summarize(records)
  seen = sum(t1 - t0 for _, t0, t1 in segments)
  total = sum(summary.seconds.values())
  assert all(v >= 0 for v in summary.seconds.values()), summary.seconds
  assert abs(total - summary.wall_s) < 1e-6 * seen  # every second in one bucket
  print(f"goodput buckets {total:.2f} s, wall time seen by the test {seen:.2f} s")
  assert abs(total - seen) <= TOLERANCE * seen, (total, seen, summary.seconds)
  # Each segment starts when its process started (not when tmlx code first ran) and ends with it.
  for r, (_, t0, t1) in zip(records, segments):
    assert t0 - 0.5 <= r["process_start"] <= t0 + 1.0 and r["updated"] <= t1 + 0.5, (r, t0, t1)

  stop = _preempted_at(segments[0][0])
  assert 5 <= stop < N
  first, second = summary.segments
  assert (first["restored_step"], first["reached_step"], first["outcome"]) == (0, stop, f"preempted at step {stop}")
  assert (second["restored_step"], second["reached_step"], second["outcome"]) == (0, N, "completed")
  # No checkpoint: the resumed segment trained every step of the first again.
  assert summary.lost_steps == second["lost_steps"] == stop and first["lost_steps"] == 0
  assert 0 < summary.seconds[goodput.LOST] == pytest.approx(records[0]["step_s"])
  assert f"goodput: {stop} step(s)" in segments[1][0], segments[1][0][-3000:]
  for name in ("compile", "restore", "productive", "profile", "startup", "data_wait"):
    assert summary.seconds[name] > 0, (name, summary.seconds)
  assert summary.seconds["checkpoint"] < TOLERANCE * seen  # checkpoint.every=0: nothing to save
  assert summary.bad_steps == 0 and summary.seconds["bad_steps"] == 0

  cli = subprocess.run(
    [sys.executable, "-m", "tmlx.goodput", f"--workdir={work}"], cwd=ROOT, capture_output=True, text=True, timeout=60
  )
  assert cli.returncode == 0, cli.stderr
  print(cli.stdout)
  assert f"{goodput.LOST}" in cli.stdout and f"({stop} step(s))" in cli.stdout, cli.stdout
  assert "2 segment(s)" in cli.stdout and "goodput " in cli.stdout


def test_compile_cache_in_the_workdir_makes_the_resumed_compile_a_hit(preempted_job):
  work, segments = preempted_job
  entries = os.listdir(work / "compile_cache")
  assert any(e.startswith("jit_train_step-") for e in entries), entries
  first, second = goodput.read_records(str(work / "goodput"))
  assert first["compile_cache"] == {"dir": str(work / "compile_cache"), "train_step_hit": False}
  assert second["compile_cache"]["train_step_hit"] is True
  assert "(persistent compilation cache hit)" in segments[1][0]
  assert "(persistent compilation cache hit)" not in segments[0][0]


# -- the rules, without a run ----------------------------------------------------------------------


def _record(start, reached, saves, step_s, bad_s=0.0, t=0.0, **seconds):
  secs = dict.fromkeys(goodput.BUCKETS, 0.0)
  secs.update(productive=step_s - bad_s, bad_steps=bad_s, **seconds)
  return {
    "version": goodput.VERSION,
    "pid": 1,
    "process_start": t,
    "updated": t + sum(secs.values()),
    "ended": True,
    "seconds": secs,
    "start_step": start,
    "reached_step": reached,
    "saves": saves,
    "step_s": step_s,
    "bad_step_s": bad_s,
    "bad_steps": int(bad_s > 0),
  }


def test_lost_steps_are_the_steps_after_the_restored_checkpoint_counted_once():
  a = _record(0, 10, [[4, 4.0, 0.0], [8, 8.0, 1.0]], 10.0, bad_s=1.0, t=0, startup=5.0)  # a bad step before 8
  b = _record(8, 12, [[10, 2.0, 0.0]], 4.0, t=100, compile=3.0)  # resumed at 8, killed after 12
  c = _record(10, 20, [], 10.0, t=200)  # resumed at 10 (B's checkpoint)
  s = goodput.summarize([a, b, c])
  assert [seg["lost_steps"] for seg in s.segments] == [0, 2, 2]  # A's 9-10 at B's start, B's 11-12 at C's
  assert [seg["lost_s"] for seg in s.segments] == pytest.approx([0.0, 2.0, 2.0])
  assert s.lost_steps == 4 and s.seconds[goodput.LOST] == pytest.approx(4.0)
  assert s.seconds["productive"] == pytest.approx(9.0 + 4.0 + 10.0 - 4.0)
  assert s.seconds["bad_steps"] == pytest.approx(1.0)
  assert sum(s.seconds.values()) == pytest.approx(s.wall_s)
  assert s.wall_s == pytest.approx(15.0 + 7.0 + 10.0) and s.downtime_s == pytest.approx(85.0 + 93.0)
  # A restore older than any save point of the segment it undoes: interpolated from its start.
  d = _record(0, 3, [], 3.0, t=300)  # from scratch: what is left of each (A's 1-8, B's 9-10, C's 11-20)
  s = goodput.summarize([a, b, c, d])
  assert s.segments[-1]["lost_steps"] == 10 + 2 + 8  # C's 11-20, B's 9-10, A's 1-8
  assert s.segments[-1]["lost_s"] == pytest.approx(10.0 + 2.0 + (8.0 - 1.0))


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def time(self):
    return self.now

  def monotonic(self):
    return self.now


def test_recorder_clock_puts_every_second_in_one_bucket(monkeypatch, tmp_path):
  clock = _Clock()
  monkeypatch.setattr(goodput, "time", types.SimpleNamespace(time=clock.time, monotonic=clock.monotonic))
  r = goodput.Recorder(process_start=997.0)  # 3 s of interpreter start-up before it
  r.attach(str(tmp_path), write=True)
  clock.now += 1
  with r.span("restore"):
    clock.now += 2
  r.restored(0)
  r.steps_begin()
  for step in (1, 2, 3):
    with r.span("data_wait"):
      clock.now += 0.5
    clock.now += 1
    r.step_done(step)
    if step == 2:
      r.saved(2)
  r.bad_step(2)  # known one step late, as in the train loop
  clock.now += 0.25
  r.ended_by("completed")
  r.ended_by("stopped: later reasons are ignored")
  r.finish()
  (record,) = goodput.read_records(str(tmp_path / "goodput"))
  assert record["seconds"] == {
    **dict.fromkeys(goodput.BUCKETS, 0.0),
    "startup": 4.0,
    "restore": 2.0,
    "data_wait": 1.5,
    "productive": 2.25,
    "bad_steps": 1.0,
  }
  assert record["updated"] - record["process_start"] == 10.75 == sum(record["seconds"].values())
  assert (record["reached_step"], record["bad_steps"], record["outcome"]) == (3, 1, "completed")
  assert record["saves"] == [[2, 2.0, 0.0]]


def test_compile_cache_directory():
  runtime = lambda **kw: ml_collections.ConfigDict({"compile_cache": True, "compile_cache_dir": "", **kw})
  assert compile_cache.directory(runtime(), "/w", env={}) == os.path.join("/w", "compile_cache")
  assert compile_cache.directory(runtime(), "gs://b/w", env={}) == "gs://b/w/compile_cache"
  assert compile_cache.directory(runtime(), "/w", env={"JAX_COMPILATION_CACHE_DIR": "/shared"}) == "/shared"
  assert compile_cache.directory(runtime(compile_cache_dir="/mine"), "/w", env={"JAX_COMPILATION_CACHE_DIR": "/x"}) == (
    "/mine"
  )
  assert compile_cache.directory(runtime(compile_cache=False, compile_cache_dir="/mine"), "/w", env={}) is None


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("start_step", -1, "config.profile.start_step=-1"),
    ("num_steps", 0, "config.profile.num_steps=0"),
    ("processes", "0,x", "config.profile.processes='0,x'"),
    ("processes", "", "config.profile.processes=''"),
  ],
)
def test_profile_config_errors_name_the_field(field, value, message):
  config = tiny_config("tiny")
  config.profile.start_step = 5
  config.profile[field] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_profile_processes():
  from tmlx import profiling

  assert profiling.processes("all") is None
  assert profiling.processes("0, 3") == (0, 3)
