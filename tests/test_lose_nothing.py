"""A hostile but realistic user of `python -m tmlx.main` and the checkpoint tools loses nothing: a
wrong override is refused without touching the checkpoints, two trainers cannot share a workdir,
nonsense optimizer and checkpoint settings are refused before compiling, a failed save stops the
run in one line, and the read-only tools never create the paths they are given.

The runs share one persistent compilation cache (the `cache_env` fixture of tests/test_faults.py)."""

import functools
import json
import os
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import ROOT, run_main, synthetic_batch, tiny_config
from tests.test_faults import N, Run, _assert_same_final_state, _assert_same_losses, _steps_on_disk, cache_env
from tmlx import checkpoint, sharding, train, workdir_lock
from tmlx import config as config_lib
from tmlx.state import state_spec

__all__ = ["cache_env"]  # the fixture, imported for its use below

TINY = "experiments/sample_cpu.py:tiny"


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


# -- 1. a wrong override -------------------------------------------------------------------------


def test_a_wrong_override_is_refused_and_the_corrected_rerun_resumes_bit_for_bit(tmp_path, cache_env):
  """Steps 2, 4, 6 saved; a rerun with another depth refuses, naming the first misfit array and the
  config field that differs, and moves nothing; the corrected rerun resumes from step 6 and ends
  bit for bit where an uninterrupted run does. A step an earlier run moved aside is mentioned on
  every start."""
  ref_dir, work = tmp_path / "ref", tmp_path / "work"
  ref = Run(ref_dir, tmp_path / "ref.log", cache_env)
  runs = [ref]
  try:
    # The schedule is constant (no warmup, final fraction 1): 6 steps then 2 more equal 8 in one go.
    first = Run(work, tmp_path / "run1.log", cache_env, "--config.train.num_steps=6")
    runs.append(first)
    assert first.wait(300) == 0, first.log[-3000:]
    assert _steps_on_disk(work / "checkpoints") == ([2, 4, 6], [])
    saved_config = (work / "config.json").read_text()
    os.mkdir(work / "checkpoints" / "3.unusable-1700000000")  # as a quarantine by an earlier run leaves it

    wrong = Run(work, tmp_path / "run2.log", cache_env, "--config.model.num_layers=3")
    runs.append(wrong)
    assert wrong.wait(120) != 0
    last = _last_line(wrong.log)
    assert last.startswith("refused: ") and "/checkpoints/6 does not fit this config: array params/" in last, last
    assert "model.num_layers: 2 → 3" in last and "Nothing was moved" in last, last
    assert "Traceback" not in wrong.log, wrong.log[-3000:]
    assert "3.unusable-1700000000" in wrong.log
    names = sorted(os.listdir(work / "checkpoints"))
    assert names == ["2", "3.unusable-1700000000", "4", "6"], names
    assert (work / "config.json").read_text() == saved_config  # the refused config did not replace it

    fixed = Run(work, tmp_path / "run3.log", cache_env)
    runs.append(fixed)
    assert fixed.wait(300) == 0, fixed.log[-3000:]
    assert "resumed from checkpoint step 6 in" in fixed.log, fixed.log[-3000:]
    assert "3.unusable-1700000000" in fixed.log and "initialized from scratch" not in fixed.log
    assert ref.wait(300) == 0, ref.log[-3000:]
  finally:
    for r in runs:
      r.kill()
  _assert_same_losses(work, ref_dir)
  _assert_same_final_state(work, ref_dir)


# -- 2. two trainers on one workdir --------------------------------------------------------------


def _metric_steps(workdir) -> list[int]:
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_trainers_on_one_workdir_one_refuses_and_a_dead_jobs_lock_is_taken_over(tmp_path, cache_env):
  """Started together, exactly one of two trainers runs and the other refuses, naming the holder;
  a third started while the first trains refuses too; the run's metrics hold every step once. A
  lock left by a process that no longer exists is taken over with a log line."""
  work = tmp_path / "work"
  a = Run(work, tmp_path / "a.log", cache_env)
  b = Run(work, tmp_path / "b.log", cache_env)
  runs = [a, b]
  try:
    codes = {}
    end = time.monotonic() + 240
    while len(codes) < 1 and time.monotonic() < end:  # the loser exits within seconds
      for r in (a, b):
        if r.proc.poll() is not None:
          codes[r] = r.proc.returncode
      time.sleep(0.1)
    assert len(codes) == 1, (a.log[-2000:], b.log[-2000:])
    loser, (winner,) = next(iter(codes)), [r for r in (a, b) if r not in codes]
    assert codes[loser] != 0, loser.log[-3000:]
    last = _last_line(loser.log)
    assert last.startswith("refused: ") and "in use by another training job" in last, last
    assert f"pid {winner.proc.pid}," in last and "Traceback" not in loser.log, last

    winner.wait_for_log("step 2/8", 240)
    late = Run(work, tmp_path / "c.log", cache_env)
    runs.append(late)
    assert late.wait(120) != 0
    assert f"pid {winner.proc.pid}," in _last_line(late.log), late.log[-3000:]
    assert winner.wait(300) == 0, winner.log[-3000:]
  finally:
    for r in runs:
      r.kill()
  assert _metric_steps(work) == list(range(1, N + 1))
  assert not (work / "LOCK").exists()  # released at the end
  assert _steps_on_disk(work / "checkpoints") == ([4, 6, 8], [])

  # A lock whose holder died (SIGKILL: no release) is taken over by the next run.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (work / "LOCK").write_text(
    json.dumps(
      {
        "host": os.uname().nodename,
        "pid": dead.pid,
        "space": workdir_lock._process_space(),  # the same kernel and pid namespace as this test
        "started": time.time() - 60,
        "heartbeat": time.time(),
      }
    )
  )
  again = Run(work, tmp_path / "d.log", cache_env)
  try:
    assert again.wait(240) == 0, again.log[-3000:]
  finally:
    again.kill()
  assert f"took over a stale lock (host {os.uname().nodename!r}, pid {dead.pid}" in again.log, again.log[-3000:]
  assert "no longer exists on this host" in again.log


# -- 3. and 4. optimizer and checkpoint settings ------------------------------------------------


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.optimizer.learning_rate=nan", "config.optimizer.learning_rate=nan: must be a finite number"),
    ("--config.optimizer.learning_rate=inf", "config.optimizer.learning_rate=inf: must be a finite number"),
    ("--config.optimizer.learning_rate=-0.1", "config.optimizer.learning_rate=-0.1: must be > 0"),
    ("--config.optimizer.final_lr_fraction=nan", "config.optimizer.final_lr_fraction=nan: must be a finite"),
    ("--config.optimizer.warmup_steps=-5", "config.optimizer.warmup_steps=-5: must be in [0, inf]"),
    ("--config.checkpoint.keep=0", "config.checkpoint.keep=0: must be > 0"),
  ],
)
def test_nonsense_optimizer_and_checkpoint_settings_are_refused_before_compiling(tmp_path, override, message):
  proc = run_main(TINY, tmp_path / "w", override, timeout=120)
  assert proc.returncode != 0
  assert _last_line(proc.stderr) == f"invalid config: {message}" or message in _last_line(proc.stderr), proc.stderr
  assert "Traceback" not in proc.stderr and "compiled train_step" not in proc.stderr
  assert not (tmp_path / "w").exists()


def test_a_non_finite_update_is_skipped_like_a_non_finite_gradient():
  """With a NaN learning rate (validation bypassed) the loss and gradient are finite but the update
  is not: the step is flagged bad and leaves the state bitwise unchanged, so it is never saved."""
  config = tiny_config("tiny")
  config.data.source = "synthetic"
  config.optimizer.learning_rate = float("nan")
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  state = jax.jit(spec.init, out_shardings=spec.shardings)()
  before = jax.device_get(state)
  step_fn = jax.jit(functools.partial(train.train_step, sc=train.step_config(config, spec, mesh, rules)))
  new, m = step_fn(state, synthetic_batch(config))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert not np.isfinite(float(m["update_norm"])) and float(m["bad_step"]) == 1.0 and int(new.step) == 1
  after = jax.device_get(new)
  for name in ("params", "model_state", "opt_state"):
    a, b = jax.tree.leaves(getattr(before, name)), jax.tree.leaves(getattr(after, name))
    assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b)), name


# -- 8. rough edges ------------------------------------------------------------------------------


def test_mixture_weights_must_be_finite_and_positive_naming_the_field():
  config = tiny_config()
  config.data.mixture = "data/sample/conversations:inf,data/sample/documents:1"
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.mixture: weight inf of '.*conversations'"):
    config_lib.validate(config)
  config.data.mixture = "data/sample/conversations:0"
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.mixture=.*weights must be positive"):
    config_lib.validate(config)


def test_config_and_path_mistakes_fail_in_one_line_and_create_nothing(tmp_path):
  """A mistyped experiment file, a misspelled override, a workdir that is a file, and mistyped
  checkpoint paths given to the read-only tools: one line each, no traceback, nothing created."""
  proc = run_main("experiments/tinyy.py", tmp_path / "w", timeout=120)
  assert proc.returncode != 0 and _last_line(proc.stderr) == "invalid --config=experiments/tinyy.py: no such file"
  proc = run_main(TINY, tmp_path / "w", "--config.optimizer.learning_rat=1", timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert _last_line(proc.stderr).startswith("invalid flags: 'learning_rat' Did you mean")
  proc = run_main("experiments/sample_cpu.py:sise=x", tmp_path / "w", timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert _last_line(proc.stderr) == (
    "invalid flags: experiments/sample_cpu.py: unknown argument key 'sise' in 'sise=x' (known: size, tiny)"
  )
  proc = run_main(TINY, tmp_path / "w", "--nosuchflag", timeout=120)
  assert proc.returncode != 0 and _last_line(proc.stderr) == "invalid flags: Unknown command line flag 'nosuchflag'"
  (tmp_path / "file").write_text("")
  proc = run_main(TINY, tmp_path / "file", timeout=120)
  assert proc.returncode != 0 and _last_line(proc.stderr).endswith("file: exists and is not a directory")

  missing = tmp_path / "no_such_run"
  wav = tmp_path / "in.wav"
  wav.write_bytes(b"")  # never read: the checkpoint is checked first
  for argv in (
    ["tmlx.checkpoint", "inspect", str(missing)],
    ["tmlx.eval", "losses", f"--checkpoint={missing}"],
    ["tmlx.eval", "duplex", f"--checkpoint={missing}", "--data=data/sample/heldout/conversations"],
    ["tmlx.stream", f"--checkpoint={missing}", f"--input={wav}", f"--out={tmp_path / 'out'}"],
  ):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, (argv, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and str(missing) in _last_line(proc.stderr), (argv, proc.stderr[-2000:])
    assert "no such directory" in _last_line(proc.stderr), (argv, proc.stderr[-2000:])
    assert not missing.exists(), argv
  assert not (tmp_path / "out").exists()


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
  resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_the_reason_of_a_failed_write_keeps_the_os_error_and_drops_the_spec():
  """Which of Orbax's writes fails first varies; when it is the open of an array, tensorstore puts
  the whole spec it opened between the OS's words and its error code."""
  kvstore = {"driver": "ocdbt", "base": "file:///w/"}
  spec = json.dumps({"driver": "zarr", "kvstore": kvstore, "metadata": {f"k{i}": i for i in range(60)}})
  where = "/w/checkpoints/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/8a60"
  text = (
    'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "model_state.blocks.moe.router_bias/.zarray" in OCDBT '
    f'database at local file "{where}": Failed writing: "{where}": Failed to write 512 bytes to file 17: '
    f"File too large [tensorstore_spec='{spec}'] [os_error_code='27']"
  )
  try:
    raise RuntimeError("saving failed") from ValueError(text)
  except RuntimeError as e:
    reason = checkpoint.handlers.reason(e)
  assert reason.startswith('ValueError: OUT_OF_RANGE: Error opening "zarr" driver: Error writing'), reason
  assert reason.endswith("File too large [os_error_code='27']"), reason
  assert "tensorstore_spec" not in reason and len(reason) < 700, reason


def test_a_failed_save_stops_the_run_in_one_line(tmp_path):
  """Every file limited to 2 MiB (as a full disk would): the first checkpoint's arrays cannot be
  written; the run exits non-zero with one line naming the step and the cause, without the flood
  of "Task exception was never retrieved" of every failed write task. (Past a file-size limit,
  tensorstore also prints "Event loop is closed" for writes it finishes after Orbax gave up; a
  full disk does not.)"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [
    sys.executable,
    "-m",
    "tmlx.main",
    f"--config={TINY}",
    f"--workdir={tmp_path / 'w'}",
    "--config.train.num_steps=8",
  ]
  proc = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size
  )
  assert proc.returncode != 0, proc.stderr[-3000:]
  (last,) = [line for line in proc.stderr.splitlines() if line.startswith("stopped: ")]
  assert last.startswith(f"stopped: saving checkpoint step 2 in {tmp_path / 'w' / 'checkpoints'} failed: "), last
  assert "File too large" in last or "EFBIG" in last or "too large" in last.lower(), last
  assert "exception was never retrieved" not in proc.stderr
  assert "step 5/8" not in proc.stderr  # it stopped at the failure (by the next save at the latest)


# -- 2. the workdir lock on object storage -------------------------------------------------------


@pytest.fixture
def s3_env():
  """An S3 emulator (moto) on 127.0.0.1 with one bucket, and the environment that points tmlx at it."""
  import urllib.request

  from moto.server import ThreadedMotoServer

  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  try:
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/tmlx-runs", method="PUT"), timeout=30).close()
    yield {
      "AWS_ENDPOINT_URL": endpoint,
      "AWS_REGION": "us-east-1",
      "AWS_ACCESS_KEY_ID": "test",
      "AWS_SECRET_ACCESS_KEY": "test",
    }
  finally:
    server.stop()


_HOLD = """
import sys, time
from tmlx import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1], heartbeat_s=0.5)
print("holding", flush=True)
while not lock.lost:
  time.sleep(0.1)
print("lost", flush=True)
"""


def test_the_workdir_lock_holds_on_object_storage(s3_env, monkeypatch):
  """On an S3-compatible store: a live holder in another process makes a second taker refuse,
  naming it; once the holder is killed its lock is taken over; a holder whose lock was taken over
  (its heartbeats were late) notices and says so."""
  for key, value in s3_env.items():
    monkeypatch.setenv(key, value)
  url = "s3://tmlx-runs/runs/a"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD, url], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by another training job .*pid {holder.pid},"):
      workdir_lock.WorkdirLock(url)
    holder.kill()
    holder.wait(30)
    taker = workdir_lock.WorkdirLock(url, heartbeat_s=0.2, stale_s=1.0)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by another training job"):
      workdir_lock.WorkdirLock(url)  # the new holder is live
    taker._stop.set()  # its heartbeats stop, as in a process that hangs
    time.sleep(1.5)
    thief = workdir_lock.WorkdirLock(url, stale_s=1.0)  # its heartbeat is stale now
    taker._stop.clear()
    taker._beat_once()
    assert taker.lost
    with pytest.raises(workdir_lock.WorkdirLockLostError, match="another job took over this workdir"):
      taker.check()
    thief.release()
    again = workdir_lock.WorkdirLock(url)  # released: free for the next run
    again.release()
  finally:
    holder.kill()
