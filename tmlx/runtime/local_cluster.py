"""N local `python -m tmlx.main` processes forming one multi-process JAX job on loopback.

  python -m tmlx.runtime.local_cluster --processes=2 -- --config=experiments/sample_cpu.py:tiny --workdir=/tmp/run

Each process gets the TMLX_* variables of `tmlx.runtime.cluster` (coordinator on a free 127.0.0.1 port),
`--config.runtime.cpu_devices=K` fake CPU devices (default 8 // N) and its own log,
`<log_dir>/process_<i>.log` (stdout and stderr). When one process fails or the deadline passes, the
others get `grace_s` to finish, then their process groups are killed: nothing is left running.
From Python: `run_local(...)` waits for the results; `start_local(...)` returns a running `Cluster`
(signal one process mid-run with `cluster.signal(i, signal.SIGTERM)`, then `cluster.wait()`);
`supervise(...)` is what the command line runs; its arguments after `--` go to every process
unparsed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

import portpicker
from absl import flags

from tmlx import cli
from tmlx.runtime import cluster as job_env

DEFAULT_TOTAL_DEVICES = 8
# Inherited variables that would change the children's devices or job membership (a local cluster
# started inside a SLURM allocation, a TPU VM or a Kubernetes pod is a job of its own).
_DROPPED_ENV = ("XLA_FLAGS", *job_env.DETECTED_VARS)


@dataclasses.dataclass(frozen=True)
class Result:
  """How one process ended."""

  process_id: int
  returncode: int  # negative: killed by that signal
  log_path: pathlib.Path
  timed_out: bool  # still running at the deadline (then killed)
  killed: bool  # killed by the harness (deadline, or a peer failed and the grace period ran out)

  @property
  def ok(self) -> bool:
    return self.returncode == 0

  @property
  def log(self) -> str:
    return self.log_path.read_text(errors="replace")


class Cluster:
  """Running processes of one local job; `wait` collects them, `kill` ends them all."""

  def __init__(self, processes: list[subprocess.Popen], log_paths: list[pathlib.Path], deadline: float, grace_s: float):
    self.processes = processes
    self.log_paths = log_paths
    self.deadline = deadline  # time.monotonic() after which running processes count as timed out
    self.grace_s = grace_s
    self._killed: set[int] = set()
    self._timed_out: set[int] = set()

  def signal(self, process_id: int, sig: int) -> None:
    """Sends `sig` to one process (not its process group), if it is still running."""
    proc = self.processes[process_id]
    if proc.poll() is None:
      proc.send_signal(sig)

  def log(self, process_id: int) -> str:
    return self.log_paths[process_id].read_text(errors="replace")

  def wait_for_log(self, process_id: int, text: str, timeout: float) -> bool:
    """Waits until `text` appears in a process's log; False if it exits or `timeout` passes first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if text in self.log(process_id):
        return True
      if self.processes[process_id].poll() is not None:
        return text in self.log(process_id)
      time.sleep(0.2)
    return False

  def kill(self) -> None:
    """SIGKILLs every process group still running (the processes and anything they started)."""
    for i, proc in enumerate(self.processes):
      if proc.poll() is None:
        self._killed.add(i)
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader if workers remain
      except (ProcessLookupError, PermissionError):
        pass
    for proc in self.processes:
      proc.wait()

  def wait(self, timeout: float | None = None) -> list[Result]:
    """Waits for every process to end, then returns one Result each (in process order).

    Processes still running at the deadline (or after `timeout` more seconds) are timed out; after
    the first non-zero exit the others get `grace_s` to end by themselves. Either way they are then
    killed, so nothing is left running when this returns.
    """
    deadline = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
    grace_end = None
    try:
      while True:
        codes = [p.poll() for p in self.processes]
        if all(c is not None for c in codes):
          break
        now = time.monotonic()
        if grace_end is None and any(c not in (None, 0) for c in codes):
          grace_end = now + self.grace_s
        if now >= deadline:
          self._timed_out.update(i for i, c in enumerate(codes) if c is None)
          break
        if grace_end is not None and now >= grace_end:
          break
        time.sleep(0.1)
    finally:
      self.kill()
    return [
      Result(
        process_id=i,
        returncode=p.returncode,
        log_path=self.log_paths[i],
        timed_out=i in self._timed_out,
        killed=i in self._killed,
      )
      for i, p in enumerate(self.processes)
    ]

  def __enter__(self) -> Cluster:
    return self

  def __exit__(self, *exc) -> None:
    self.kill()


def start_local(
  num_processes: int,
  main_args: Sequence[str],
  *,
  devices_per_process: int | None = None,
  timeout_s: float = 600,
  log_dir: str | os.PathLike | None = None,
  env: Mapping[str, str] | None = None,
  cwd: str | os.PathLike | None = None,
  grace_s: float = 10,
  heartbeat_timeout_s: int = 10,
) -> Cluster:
  """Starts `num_processes` × `python -m tmlx.main <main_args>` as one job and returns at once.

  `devices_per_process` fake CPU devices each (default 8 // num_processes; 0 leaves the config's);
  `env` adds to (or overrides) the inherited environment; a process silent for
  `heartbeat_timeout_s` is declared dead by the coordinator.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be at least 1")
  if devices_per_process is None:
    devices_per_process = max(1, DEFAULT_TOTAL_DEVICES // num_processes)
  log_dir = pathlib.Path(tempfile.mkdtemp(prefix="tmlx_cluster_") if log_dir is None else log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  base_env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
  base_env.update(
    {
      "PYTHONUNBUFFERED": "1",
      job_env.ENV_COORDINATOR: f"127.0.0.1:{portpicker.pick_unused_port()}",
      job_env.ENV_NUM_PROCESSES: str(num_processes),
      job_env.ENV_HEARTBEAT_TIMEOUT: str(heartbeat_timeout_s),
      job_env.ENV_INIT_TIMEOUT: str(max(1, int(min(timeout_s, 300)))),
    }
  )
  base_env.update(env or {})
  cmd = [sys.executable, "-m", "tmlx.main", *main_args]
  if devices_per_process > 0:
    cmd.append(f"--config.runtime.cpu_devices={devices_per_process}")
  processes, log_paths = [], []
  deadline = time.monotonic() + timeout_s
  try:
    for i in range(num_processes):
      path = log_dir / f"process_{i}.log"
      with open(path, "wb") as log:
        processes.append(
          subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**base_env, job_env.ENV_PROCESS_ID: str(i)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as a whole, no orphans
          )
        )
      log_paths.append(path)
  except BaseException:
    Cluster(processes, log_paths, deadline, grace_s).kill()
    raise
  return Cluster(processes, log_paths, deadline, grace_s)


def run_local(num_processes: int, main_args: Sequence[str], **options) -> list[Result]:
  """Runs the job to the end (`start_local` with the same options); one Result per process, in
  process order."""
  return start_local(num_processes, main_args, **options).wait()


def supervise(num_processes: int, main_args: Sequence[str], **options) -> int:
  """Runs the job to the end as the command line does (`start_local` with the same options),
  printing where the logs are, how each process ended and the last lines of the first failed
  one's log; returns 0 if every process succeeded, 1 if one failed, 130 if interrupted (then every
  process is killed)."""
  cluster = start_local(num_processes, main_args, **options)
  print(f"started {num_processes} processes; logs in {cluster.log_paths[0].parent}", flush=True)
  try:
    results = cluster.wait()
  except KeyboardInterrupt:
    cluster.kill()
    print("interrupted: all processes killed", file=sys.stderr)
    return 130
  for r in results:
    note = " (timed out)" if r.timed_out else " (killed after a peer failed)" if r.killed else ""
    print(f"process {r.process_id}: exit code {r.returncode}{note}  {r.log_path}")
  failed = [r for r in results if not r.ok]
  for r in failed[:1]:
    tail = "\n".join(r.log.splitlines()[-20:])
    print(f"--- last lines of process {r.process_id}'s log ---\n{tail}", file=sys.stderr)
  return 1 if failed else 0


# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m tmlx.runtime.local_cluster"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("processes", None, "Number of processes.", required=True, lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("devices_per_process", None, "Fake CPU devices each (default 8 // N).", flag_values=fv)
  flags.DEFINE_float("timeout_s", 3600, "Deadline for the whole job.", flag_values=fv)
  flags.DEFINE_float("grace_s", 10, "Time the others get after one fails.", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout_s", 10, "A silent process is dead after this.", flag_values=fv)
  if "log_dir" in fv:  # absl's FLAGS has absl.logging's --log_dir, a directory for log files: it serves
    flags.declare_key_flag("log_dir", flag_values=fv)
  else:
    flags.DEFINE_string("log_dir", None, "Where process_<i>.log go (default: a new temp dir).", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """`supervise`s the job the parsed command line asks for: the arguments after `--` (parsed with
  `passthrough`) are the tmlx.main arguments."""
  own, main_args = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
  if own:
    cli.fail(PROG, f"unexpected arguments before --: {' '.join(own)}; the tmlx.main arguments go after --")
  if not main_args:
    cli.fail(PROG, "give the tmlx.main arguments after --, e.g. -- --config=experiments/sample_cpu.py --workdir=DIR")
  names = ("devices_per_process", "timeout_s", "grace_s", "heartbeat_timeout_s")
  options = {name: fv[name].value for name in names}
  return supervise(fv.processes, main_args, log_dir=fv.log_dir or None, **options)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.runtime.local_cluster ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv, passthrough=True)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run, passthrough=True)
