"""Real multi-process jobs on loopback (launch/local.sh, tmlx.runtime.local_cluster): 2 processes x 4 fake
devices train like 1 process x 8, share one workdir, and write checkpoints a 1-process run restores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, run_main
from tmlx.runtime import cluster as job_env
from tmlx.runtime import distributed, local_cluster

TINY = "experiments/sample_cpu.py:tiny"
# fp32, and a constant learning rate: runs of different lengths then take identical steps.
COMMON = (
  "--config.model.compute_dtype=float32",
  "--config.checkpoint.every=2",
  "--config.optimizer.warmup_steps=0",
  "--config.optimizer.final_lr_fraction=1.0",
)


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _failure(results) -> str:
  return "\n".join(f"--- process {r.process_id}: exit {r.returncode}\n{r.log[-3000:]}" for r in results if not r.ok)


def _digests(log: str) -> dict[int, dict[int, str]]:
  """{step: {global row: crc32}} from the "row digests of step N" lines of a log."""
  out: dict[int, dict[int, str]] = {}
  for line in log.splitlines():
    if "row digests of step " in line:
      head, rows = line.split("row digests of step ")[1].split(": ", 1)
      out.setdefault(int(head), {}).update(dict(pair.split(":") for pair in rows.split()))
  return {step: {int(r): crc for r, crc in rows.items()} for step, rows in out.items()}


def test_two_processes_through_the_launcher_train_like_one_and_checkpoint_across_process_counts(tmp_path):
  """launch/local.sh 2 on a hybrid mesh (data over the 2 processes as DCN, expert=4 within each)
  against 1 process x 8 devices (data=2 x expert=4): each process reads only its own rows, the
  global batches are the same rows, the losses agree (not bitwise: the cross-process all-reduce
  sums in another order than the in-process one; measured differences are about 2e-7 relative,
  the tolerance is 1e-5), only process 0 writes metrics, and the 2-process checkpoint continues
  in 1 process like the reference."""
  two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
  logs = tmp_path / "logs"
  launcher = subprocess.Popen(
    [
      "bash",
      str(ROOT / "launch" / "local.sh"),
      "2",
      f"--config={TINY}",
      f"--workdir={two}",
      "--config.train.num_steps=4",
      "--config.mesh.data=1",
      "--config.mesh.dcn.data=2",
      "--config.logging.row_digests=true",
      *COMMON,
    ],
    env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "LOG_DIR": str(logs), "PYTHON": sys.executable},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    ref = run_main(TINY, one, "--config.train.num_steps=5", "--config.logging.row_digests=true", *COMMON, timeout=150)
    out, _ = launcher.communicate(timeout=150)
  finally:
    launcher.kill()
  proc_logs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  assert launcher.returncode == 0, out[-2000:] + "\n".join(log[-3000:] for log in proc_logs)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1} on 2 processes" in proc_logs[1]
  assert "distributed: process 1 of 2" in proc_logs[1]

  # Each process read only its own rows, and its devices hold exactly those rows of the global
  # batch; together they are the 1-process run's batch, row for row.
  batch = json.loads((one / "config.json").read_text())["config"]["data"]["global_batch_size"]
  half = batch // 2
  ref_rows = _digests(ref.stderr)
  for i, log in enumerate(proc_logs):
    assert f"data: process {i} reads rows {i * half}..{(i + 1) * half - 1} of each global batch of {batch}" in log
    for step, rows in _digests(log).items():
      assert sorted(rows) == list(range(i * half, (i + 1) * half)), (i, step, sorted(rows))
      assert rows == {r: ref_rows[step][r] for r in rows}, (i, step)
  assert sorted(_digests(proc_logs[0])) == [1, 2, 3, 4]

  # The same losses up to fp32 reduction order. Only process 0 wrote metrics: the file is opened for appending,
  # so a second writer would repeat every step. Progress lines come from process 0 only.
  rows, ref_rows = _metrics(two), _metrics(one)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert "step 4/4" in proc_logs[0] and "step 4/4" not in proc_logs[1]
  for r, r_ref in zip(rows, ref_rows):
    assert r["data/windows"] == r_ref["data/windows"]  # summed over both processes
    for key in ("loss", "text_loss", "flow_loss", "grad_norm", "moe_dropped_fraction"):
      assert r[key] == pytest.approx(r_ref[key], rel=1e-5, abs=1e-6), (r["step"], key, r[key], r_ref[key])
  config = json.loads((two / "config.json").read_text())["config"]
  assert (config["runtime"]["cpu_devices"], config["train"]["num_steps"]) == (4, 4)
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]

  # The 2-process checkpoint restores on 1 process x 8 devices and continues exactly like the reference.
  shutil.copytree(two, resumed)
  proc = run_main(TINY, resumed, "--config.train.num_steps=5", *COMMON, timeout=150)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint step 4" in proc.stderr and "step 5/5" in proc.stderr
  rows = _metrics(resumed)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  for key in ("loss", "text_loss", "flow_loss", "grad_norm"):
    assert rows[-1][key] == pytest.approx(ref_rows[-1][key], rel=1e-5, abs=1e-6), (key, rows[-1][key])


def test_harness_times_out_and_kills_peers_of_a_failed_process(tmp_path):
  """Processes that wait for a third that never comes: the deadline, then a failure with a grace period."""
  args = [f"--config={TINY}", f"--workdir={tmp_path / 'w'}"]
  hang = {job_env.ENV_NUM_PROCESSES: "3"}  # only 2 start: both block in initialize
  t0 = time.monotonic()
  results = local_cluster.run_local(2, args, timeout_s=6, log_dir=tmp_path / "a", env=hang, cwd=ROOT)
  assert [(r.timed_out, r.killed, r.returncode) for r in results] == [(True, True, -signal.SIGKILL)] * 2
  cluster = local_cluster.start_local(2, args, timeout_s=60, log_dir=tmp_path / "b", env=hang, cwd=ROOT, grace_s=1)
  with cluster:
    assert cluster.wait_for_log(1, "Connecting to JAX distributed service", timeout=30), cluster.log(1)
    cluster.signal(0, signal.SIGKILL)
    results = cluster.wait()
  assert [(r.timed_out, r.killed, r.returncode) for r in results] == [
    (False, False, -signal.SIGKILL),
    (False, True, -signal.SIGKILL),
  ]
  assert time.monotonic() - t0 < 45
  assert all(p.poll() is not None for p in cluster.processes)


@pytest.mark.parametrize(
  "env, message",
  [
    ({"TMLX_NUM_PROCESSES": "2"}, "TMLX_COORDINATOR_ADDRESS, TMLX_PROCESS_ID missing"),
    ({"TMLX_COORDINATOR_ADDRESS": "127.0.0.1", "TMLX_NUM_PROCESSES": "2", "TMLX_PROCESS_ID": "0"}, "not host:port"),
    ({"TMLX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "TMLX_NUM_PROCESSES": "2", "TMLX_PROCESS_ID": "2"}, "below"),
    ({"TMLX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "TMLX_NUM_PROCESSES": "two", "TMLX_PROCESS_ID": "0"}, "integer"),
  ],
)
def test_bad_environment_names_the_variable(monkeypatch, env, message):
  for name in (*job_env.EXPLICIT_VARS, job_env.ENV_INIT_TIMEOUT, job_env.ENV_HEARTBEAT_TIMEOUT):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize_from_env() is None  # nothing set: a single process, nothing done
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(job_env.DistributedEnvError, match=message):
    distributed.initialize_from_env()


def test_settings_from_env():
  s = job_env.settings_from_env(
    {"TMLX_COORDINATOR_ADDRESS": "localhost:5000", "TMLX_NUM_PROCESSES": "4", "TMLX_PROCESS_ID": "3"}
  )
  assert (s.num_processes, s.process_id, s.init_timeout_s, s.loopback_host) == (4, 3, 300, "127.0.0.1")
  s = job_env.settings_from_env(
    {
      "TMLX_COORDINATOR_ADDRESS": "10.0.0.1:5000",
      "TMLX_NUM_PROCESSES": "2",
      "TMLX_PROCESS_ID": "0",
      "TMLX_INIT_TIMEOUT_S": "9",
    }
  )
  assert (s.init_timeout_s, s.loopback_host) == (9, None)


def test_a_hung_peer_fails_the_job_within_the_heartbeat_timeout(tmp_path):
  """SIGSTOP one of 2 processes mid-run (hung: no heartbeats): the other ends with an error naming
  the silent process within the heartbeat timeout (10 s here), instead of waiting for ever."""
  cluster = local_cluster.start_local(
    2,
    [f"--config={TINY}", f"--workdir={tmp_path / 'w'}", "--config.train.num_steps=200", "--config.checkpoint.every=0"],
    devices_per_process=4,
    timeout_s=200,
    log_dir=tmp_path / "logs",
    cwd=ROOT,
    heartbeat_timeout_s=10,
  )
  with cluster:
    assert cluster.wait_for_log(0, "step 3/200", 150), cluster.log(0)[-3000:]
    cluster.signal(1, signal.SIGSTOP)
    stopped = time.monotonic()
    while cluster.processes[0].poll() is None and time.monotonic() - stopped < 60:
      time.sleep(0.2)
    waited = time.monotonic() - stopped
    cluster.signal(1, signal.SIGKILL)
    results = cluster.wait()
  assert results[0].returncode not in (0, None) and not results[0].killed, results[0].log[-3000:]
  assert waited < 30, waited
  assert "stopped sending heartbeats" in results[0].log, results[0].log[-3000:]


def test_the_watchdog_ends_a_process_that_makes_no_progress():
  """A process alive but stuck (heartbeats go on) ends by itself after train.step_timeout_s."""
  code = "import time; from tmlx.faults import Watchdog; w = Watchdog(1.0); w.beat(7); time.sleep(60)"
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "no progress for" in proc.stderr and "on step 7" in proc.stderr and "step_timeout_s=1" in proc.stderr
  assert "tmlx-watchdog" in proc.stderr or "Thread 0x" in proc.stderr  # the stacks
  assert time.monotonic() - t0 < 50
