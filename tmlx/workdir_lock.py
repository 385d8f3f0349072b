"""One trainer per workdir: a lock record that the running job holds in `<workdir>/LOCK`.

Process 0 holds it on behalf of every process of the job. The record (JSON) names the holder's
host, process id and start time, and carries a heartbeat time that a background thread refreshes
every `HEARTBEAT_S` seconds. Every change of the record is a conditional write through
tensorstore's key-value layer (write only if the record is still the generation this process last
saw, or absent): atomic on a local disk and on object stores with conditional writes (GCS
generations; S3 and S3-compatible stores that honour If-Match / If-None-Match), so two trainers
racing for one workdir cannot both win.

A second trainer finds the record and refuses, naming the holder, unless the holder is gone:
  - on the same host and in the same pid namespace, its process id no longer exists (or is this
    process's own: a restarted container reuses process ids);
  - on any host, its heartbeat is older than `STALE_S` seconds (by the reader's clock).
A stale lock is taken over (again by a conditional write: of several trainers taking it over at
once, one wins), with a log line naming the job that left it. A holder that finds its record
replaced (its heartbeats stopped for longer than STALE_S and another job took over) stops at the
next step boundary rather than write into the other job's workdir.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
import psutil
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils

LOCK_KEY = "LOCK"
HEARTBEAT_S = 15.0
STALE_S = 120.0
_NO_VALUE = b"\x02"  # tensorstore's generation of a key that does not exist
_HELD: set[str] = set()  # tokens of the locks this process holds


class WorkdirLockedError(RuntimeError):
  """Another live job holds the workdir's lock."""


class WorkdirLockLostError(RuntimeError):
  """Another job took over the lock of a running job (whose heartbeats were late)."""


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_space() -> str:
  """Where this process's id means something: the kernel boot and the pid namespace. Two containers
  on one host may share a host name (host networking) but not this, so a pid is compared only
  within one space."""
  try:
    namespace = str(os.stat("/proc/self/ns/pid").st_ino)
  except OSError:
    namespace = ""
  return f"{_read('/proc/sys/kernel/random/boot_id')}/{namespace}"


def kvstore_spec(workdir: str) -> dict | str:
  """The tensorstore key-value store of a workdir: a local directory, `gs://BUCKET/PATH`,
  `s3://BUCKET/PATH` (an S3-compatible store elsewhere than AWS is named by the AWS SDKs'
  variables AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, its region by AWS_REGION), or any other
  tensorstore kvstore URL."""
  scheme, sep, rest = workdir.partition("://")
  if not sep:
    return {"driver": "file", "path": os.path.abspath(workdir) + "/"}
  bucket, _, path = rest.partition("/")
  path = path.strip("/") + "/" if path.strip("/") else ""
  if scheme == "gs":
    return {"driver": "gcs", "bucket": bucket, "path": path}
  if scheme == "s3":
    spec = {"driver": "s3", "bucket": bucket, "path": path}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
      spec["endpoint"] = endpoint
    if region:
      spec["aws_region"] = region
    return spec
  return workdir.rstrip("/") + "/"


def _holder(current) -> dict:
  """The lock record of a tensorstore read result ({} when missing or not a JSON object)."""
  if current.state == "missing":
    return {}
  try:
    record = json.loads(current.value)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started", 0)))
  return f"host {record.get('host')!r}, pid {record.get('pid')}, started {started}"


class WorkdirLock:
  """Acquires `<workdir>/LOCK` on construction (raises WorkdirLockedError if a live job holds it)
  and keeps it fresh until `release()`. `lost` becomes True if another job took it over."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.workdir = workdir
    self.stale_s = stale_s
    self.lost = False
    self._store = ts.KvStore.open(kvstore_spec(workdir)).result()
    token = uuid.uuid4().hex
    self._record = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "space": _process_space(),
      "started": time.time(),
      "token": token,
    }
    self._generation = self._acquire()
    _HELD.add(token)
    self._stop = threading.Event()
    self._io = threading.Lock()
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="tmlx-workdir-lock", daemon=True)
    self._thread.start()

  @property
  def where(self) -> str:
    return f"{self.workdir.rstrip('/')}/{LOCK_KEY}"

  def _write(self, if_equal: bytes) -> bytes:
    """Writes this job's record if the stored one is still `if_equal`; b'' when it is not."""
    value = json.dumps({**self._record, "heartbeat": time.time()}).encode()
    return self._store.write(LOCK_KEY, value, if_equal=if_equal).result().generation

  def _acquire(self) -> bytes:
    for _ in range(5):  # each round either wins, refuses, or saw the record change under it
      current = self._store.read(LOCK_KEY).result()
      if current.state == "missing":
        generation = self._write(_NO_VALUE)
        if generation:
          return generation
        continue
      holder = _holder(current)
      why = self._stale(holder)
      if why is None:
        raise WorkdirLockedError(
          f"{self.where}: this workdir is in use by another training job ({describe(holder)}, last heartbeat "
          f"{time.time() - float(holder.get('heartbeat', 0)):.0f} s ago); stop that job or use another --workdir "
          f"(the lock of a job that died is taken over by the next run: at once on the same host, after "
          f"{self.stale_s:.0f} s without a heartbeat from another host)"
        )
      generation = self._write(current.stamp.generation)
      if generation:
        logging.warning("%s: took over a stale lock (%s; %s)", self.where, describe(holder), why)
        return generation
    raise WorkdirLockedError(f"{self.where}: the lock record kept changing while taking it; is another job starting?")

  def _stale(self, holder: dict) -> str | None:
    """Why `holder`'s lock may be taken over, or None while it is live."""
    try:
      pid, beat = int(holder["pid"]), float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
      return "the record is unreadable"
    if holder.get("host") == self._record["host"] and holder.get("space") == self._record["space"]:
      if pid == os.getpid() and holder.get("token") not in _HELD:  # a restarted container reuses pids
        return f"process {pid} is this process, started again"
      if not psutil.pid_exists(pid):
        return f"process {pid} no longer exists on this host"
    age = time.time() - beat
    if age > self.stale_s:
      return f"its last heartbeat is {age:.0f} s old"
    return None

  def _beat(self, every_s: float) -> None:
    while not self._stop.wait(every_s) and not self.lost:
      self._beat_once()

  def _beat_once(self) -> None:
    """Refreshes the heartbeat if the record is still this job's; else marks the lock lost."""
    with self._io:
      if self._stop.is_set() or self.lost:
        return
      try:
        generation = self._write(self._generation)
      except Exception as e:  # a storage hiccup: the next beat tries again
        logging.warning("%s: heartbeat failed (%s); retrying", self.where, e)
        return
      if not generation:  # the record changed: another job's, or our own write that we saw fail
        try:
          current = self._store.read(LOCK_KEY).result()
        except Exception as e:
          logging.warning("%s: heartbeat failed (%s); retrying", self.where, e)
          return
        if _holder(current).get("token") == self._record["token"]:
          self._generation = current.stamp.generation
          return
        self.lost = True
        logging.error("%s: another job took over this workdir's lock; stopping at the next step", self.where)
        return
      self._generation = generation

  def check(self) -> None:
    """Raises WorkdirLockLostError if the lock was taken over by another job."""
    if self.lost:
      raise WorkdirLockLostError(
        f"{self.where}: another job took over this workdir while this one ran (its heartbeats were late by "
        f"more than {self.stale_s:.0f} s); stopped without writing further"
      )

  def release(self) -> None:
    """Deletes the record if it is still this job's."""
    self._stop.set()
    _HELD.discard(self._record["token"])
    with self._io:
      if not self.lost:
        try:
          self._store.write(LOCK_KEY, None, if_equal=self._generation).result()
        except Exception as e:
          logging.warning("%s: could not remove the lock (%s); the next run takes it over as stale", self.where, e)


def lock_for_job(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the lock on behalf of the job; every process raises if it could not."""
  lock, refused = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir)
    except WorkdirLockedError as e:
      refused = str(e)
    except Exception as e:  # storage refused or unreachable: every process must hear of it
      refused = f"{workdir}: cannot take the workdir lock: {type(e).__name__}: {e}"
  if jax.process_count() > 1:
    if multihost_utils.process_allgather(np.int32(bool(refused))).max() and not refused:
      refused = f"{workdir}: process 0 found this workdir in use by another training job (its log names the job)"
  if refused:
    raise WorkdirLockedError(refused)
  return lock
