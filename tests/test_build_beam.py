"""Dataset builds as shards: the same bytes from the in-process build and from Apache Beam's
DirectRunner with one or three worker processes, the skips counted as the in-memory builders count
them, a build killed with SIGKILL resumed to the same bytes, and bad runner options refused."""

import collections
import functools
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest

from data_pipelines import build, shards, stats
from data_pipelines.builders import Builder
from data_pipelines.episode import DataError, EpisodeReader
from data_pipelines.sample_corpus.recordings import BAD, write_recordings
from tests.helpers import ROOT, run_build

MULTI = ["--direct_running_mode=multi_processing"]
LOUD = "--default_sdk_harness_log_level=INFO"  # workers log which process wrote each shard


def digests(out: pathlib.Path) -> dict[str, str]:
  """SHA-256 of every shard and of the manifest (the parts under build/ are the build's own)."""
  names = sorted(p.name for p in out.iterdir() if p.is_file())
  return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> pathlib.Path:
  return write_recordings(tmp_path_factory.mktemp("raw") / "in", 18, seconds=3.0, bad=True)


def test_one_and_three_beam_workers_write_the_bytes_the_in_process_build_writes(recordings, tmp_path):
  common = ["audio", str(recordings), "--episodes_per_shard=3"]
  alone = run_build(*common, f"--out={tmp_path / 'alone'}")
  assert alone.returncode == 0, alone.stderr[-3000:]
  one = run_build(*common, f"--out={tmp_path / 'one'}", "--runner=DirectRunner", "--", "--direct_num_workers=1", *MULTI)
  assert one.returncode == 0, one.stderr[-3000:]
  three = run_build(
    *common, f"--out={tmp_path / 'three'}", "--runner=DirectRunner", "--", "--direct_num_workers=3", *MULTI, LOUD
  )
  assert three.returncode == 0, three.stderr[-3000:]
  assert len(set(re.findall(r"written by process (\d+)", three.stderr))) >= 2  # the shards were shared out
  expected = digests(tmp_path / "alone")
  listed = json.loads((tmp_path / "alone" / "manifest.json").read_text())["shards"]
  count = len(list((tmp_path / "alone" / shards.PARTS).glob("*.json")))
  assert count == math.ceil(len(Builder("audio").items([recordings])) / 3) == 10  # 18 recordings, 10 bad inputs
  assert len(expected) == 1 + len(listed) and len(listed) >= 6
  assert digests(tmp_path / "one") == expected
  assert digests(tmp_path / "three") == expected

  # The skips are counted per reason as the in-memory builder counts them, and recorded.
  episodes, skips = build.build_audio_episodes([recordings])
  assert skips == collections.Counter(BAD.values())
  manifest = json.loads((tmp_path / "three" / "manifest.json").read_text())
  assert manifest["skipped"] == dict(sorted(skips.items()))
  reason_lines = "".join(f"  {reason}: {n}\n" for reason, n in sorted(skips.items()))
  assert f"episodes written: {len(episodes)}\nskipped: {len(BAD)}\n{reason_lines}" in three.stdout
  # Every episode is there once, and its shard is the one its id hashes to.
  reader = EpisodeReader(tmp_path / "three")
  assert sorted(reader.read(k).id for k in range(len(reader))) == sorted(ep.id for ep in episodes)
  for entry in manifest["episodes"]:
    assert entry["shard"] == shards.shard_name(shards.shard_of(entry["id"], count), count)
  assert manifest["stats"] == functools.reduce(stats.add, map(stats.episode_stats, episodes))


def test_a_build_killed_mid_way_resumes_to_the_same_bytes_and_keeps_the_finished_shards(tmp_path):
  raw = write_recordings(tmp_path / "in", 40, seconds=6.0, rates=(48000,))
  common = ["audio", str(raw), "--num_shards=20"]
  whole = run_build(*common, f"--out={tmp_path / 'whole'}")
  assert whole.returncode == 0, whole.stderr[-3000:]

  out = tmp_path / "killed"
  args = [sys.executable, "-m", "data_pipelines.build", *common, f"--out={out}", "--runner=DirectRunner"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  parts = out / shards.PARTS
  end = time.monotonic() + 240
  while not (parts.is_dir() and len(list(parts.glob("*.json"))) >= 3):
    assert proc.poll() is None, "the build ended before it could be killed"
    assert time.monotonic() < end, "no shard was written in time"
    time.sleep(0.005)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(30)
  finished = len(list(parts.glob("*.json")))
  assert 3 <= finished < 20 and not (out / "manifest.json").exists()

  # One finished shard is damaged after the kill: it is not "complete and verified", so it is rebuilt.
  written = [json.loads(p.read_text())["shard"] for p in sorted(parts.glob("*.json"))]
  damaged = out / next(name for name in written if name)
  data = bytearray(damaged.read_bytes())
  data[len(data) // 2] ^= 0xFF
  damaged.write_bytes(bytes(data))
  resumed = run_build(*common, f"--out={out}", "--runner=DirectRunner", "--", "--direct_num_workers=2", *MULTI)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"shards: {20 - finished + 1} written, {finished - 1} kept from an earlier build" in resumed.stdout
  assert digests(out) == digests(tmp_path / "whole")
  assert sorted(p.name for p in parts.iterdir()) == sorted(
    p.name for p in (tmp_path / "whole" / shards.PARTS).iterdir()
  )


def test_a_changed_input_rebuilds_only_its_shard(tmp_path):
  raw = write_recordings(tmp_path / "in", 8, seconds=2.0)
  out = tmp_path / "out"
  assert build.main(["audio", str(raw), f"--out={out}", "--num_shards=4"]) == 0
  plan = shards.plan(Builder("audio"), [raw], out, num_shards=4)
  changed = next(it for it in plan.items[0] if len(it.files) == 1)
  os.utime(changed.files[0], ns=(0, 0))  # a new version of one recording (its time, here)
  transcript = pathlib.Path(plan.items[2][0].stem + ".json")
  transcript.write_text(transcript.read_text() + " ")  # and of another one's transcript
  plan = shards.plan(Builder("audio"), [raw], out, num_shards=4)
  assert [shards.is_complete(plan, s) for s in range(4)] == [False, True, False, True]
  assert shards.plan(Builder("audio", {"swap_channels": True}), [raw], out, num_shards=4).digest(1) != plan.digest(1)


def test_runner_options_are_checked_before_any_input_is_read(tmp_path, recordings):
  out = tmp_path / "out"
  typo = run_build("audio", str(recordings), f"--out={out}", "--runner=DirectRunner", "--", "--direct_num_wrkers=2")
  assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].endswith(
    "error: unknown pipeline option '--direct_num_wrkers=2' (after --; see the options of DirectRunner)"
  )
  assert not out.exists()
  stray = run_build("audio", str(recordings), f"--out={out}", "--", "--direct_num_workers=2")
  assert stray.returncode == 2 and "give --runner too" in stray.stderr


def test_bad_runners_and_inputs_that_match_nothing_fail_in_one_line_and_keep_the_dataset(tmp_path, recordings):
  out = tmp_path / "out"
  assert build.main(["audio", str(recordings), f"--out={out}"]) == 0
  before = digests(out)
  for args, message in (
    ([str(recordings / "*.WAV")], "no audio inputs in"),
    ([str(tmp_path / "empty")], "no audio inputs in"),
    ([str(recordings), "--runner=NoSuchRunner"], "--runner=NoSuchRunner: Unexpected pipeline runner"),
    ([str(recordings), "--runner=DirectRunner", "--", "--direct_num_workers=many"], "bad pipeline option: argument"),
    ([str(recordings), "--runner=DirectRunner", "--", "--runner=FlinkRunner"], "give the runner as --runner before"),
  ):
    (tmp_path / "empty").mkdir(exist_ok=True)
    done = run_build("audio", f"--out={out}", *args)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and message in last and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
    assert digests(out) == before, args


def test_text_builds_are_the_same_bytes_on_beam_and_errors_pickle_whole(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  lines = [
    json.dumps({"turns": [{"speaker": "user", "text": f"q{k}"}, {"speaker": "model", "text": f"a {k}"}]})
    for k in range(30)
  ]
  (docs / "chats.jsonl").write_text("\n".join(lines[:10] + ["{oops", ""] + lines[10:]) + "\n")
  (docs / "note.txt").write_text("Some words.\n\nMore words.\n")
  alone = run_build("text", str(docs), f"--out={tmp_path / 'alone'}", "--episodes_per_shard=4")
  two = run_build(
    "text",
    str(docs),
    f"--out={tmp_path / 'two'}",
    "--episodes_per_shard=4",
    "--runner=DirectRunner",
    "--",
    "--direct_num_workers=2",
    *MULTI,
  )
  assert alone.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
  assert "episodes written: 31\nskipped: 1\n  transcript: 1\n" in two.stdout
  assert digests(tmp_path / "two") == digests(tmp_path / "alone")
  error = pickle.loads(pickle.dumps(DataError("truncated", "x.wav", "holds 3 of 6 frames")))
  assert (error.reason, error.where, str(error)) == ("truncated", "x.wav", "x.wav: holds 3 of 6 frames")
