"""Hostile episode datasets: headers that claim more than their records hold, manifests that point
outside their directory, and the inspect CLI given a mistyped path.

The pipeline runs on a crafted header happen in a subprocess with a time limit and an address-space
limit, so that a reader that trusts the header fails the test instead of hanging the suite.
"""

import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines import episode as ep_lib
from data_pipelines.align import AlignSpec, align
from data_pipelines.episode import DataError, Episode, Word
from data_pipelines.tokenizer import ByteTokenizer
from tests.helpers import ROOT
from tests.test_episodes import known_episode

_ADDRESS_SPACE = 4 << 30  # bytes the pipeline subprocess may map: about twice what it needs
_TIMEOUT = 120  # seconds; the pipeline takes a few on a good dataset


def _text_episode(eid: str) -> Episode:
  return Episode(id=eid, duration=2.0, model_words=[Word(0.2 * j, 0.2 * j + 0.1, f"w{j}") for j in range(9)])


def _video_episode(eid: str) -> Episode:
  times = np.arange(10) * 0.2 + 0.05
  frames = np.zeros((10, 80, 80, 3), np.uint8)
  return Episode(id=eid, duration=2.0, frames=frames, frame_times=times, model_words=[Word(0.5, 0.7, "look")])


def _craft(directory: pathlib.Path, eid: str, header: dict | None = None, records: int | None = None) -> None:
  """Rewrites episode `eid`'s header record with `header`'s fields ("media.num_samples": value, ...)
  replaced, and with `records` its manifest record count; the rest of the dataset stays as written."""
  manifest = json.loads((directory / ep_lib.MANIFEST).read_text())
  info = next(e for e in manifest["episodes"] if e["id"] == eid)
  shard = directory / info["shard"]
  reader = ArrayRecordReader(str(shard))
  data = list(reader.read_all())
  reader.close()
  fields, arrays = ep_lib._unpack(data[info["index"]], "craft", "episode")
  for key, value in (header or {}).items():
    *parents, leaf = key.split(".")
    node = fields
    for p in parents:
      node = node[p]
    node[leaf] = value
  fields = {k: v for k, v in fields.items() if k not in ("schema", "arrays")}
  data[info["index"]] = ep_lib._pack(fields, {k: np.array(v) for k, v in arrays.items()})
  writer = ArrayRecordWriter(str(shard) + ".tmp", ep_lib.WRITER_OPTIONS)
  for r in data:
    writer.write(r)
  writer.close()
  os.replace(str(shard) + ".tmp", shard)
  if records is not None:
    info["records"] = records
    (directory / ep_lib.MANIFEST).write_text(json.dumps(manifest))


_PIPELINE = r"""
import collections, importlib, json, sys

import data_pipelines
from data_pipelines.episode import DataError

c = importlib.import_module("experiments.sample_cpu").get_config("tiny")
c.data.mixture = sys.argv[1]
c.data.seq_len = 256
c.data.global_batch_size = 2
c.data.num_threads = 1
c.data.prefetch = 1
c.data.on_error = "raise"
out = {"raised": None}
try:
  source = data_pipelines.make_source(c)
  for r in range(40):
    source.row(0, r)
except DataError as e:
  out["raised"] = [e.reason, str(e)]
c.data.on_error = "skip"
total = collections.Counter()
for _, stats in data_pipelines.make_dataset(c, start_step=0, num_steps=4, process_index=0, process_count=1):
  total.update({k: int(v) for k, v in stats.items()})
out["skip"] = dict(total)
print(json.dumps(out))
"""


def _limit_address_space():
  resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))


def _run_pipeline(directory: pathlib.Path) -> dict:
  """Rows of `directory` in raise mode, then batches in skip mode, in a bounded subprocess."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  try:
    proc = subprocess.run(
      [sys.executable, "-c", _PIPELINE, str(directory)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=_TIMEOUT,
      preexec_fn=_limit_address_space,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f"the pipeline on {directory} ran past {_TIMEOUT} s (a header trusted without bound?)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_N = 10**12  # samples
_SPAN = 25 * 3200  # samples of one default chunk

CRAFTED = {  # victim episode, header fields, manifest records, reason, what the error must say
  # num_samples disagrees with the chunk count (and with the duration).
  "num_samples": ("audio", {"media.num_samples": _N}, None, "schema", r"'media.num_samples' is 1000000000000"),
  # num_samples agrees with the duration, not with the one chunk the record holds: this hung align().
  "num_samples_and_duration": (
    "audio",
    {"media.num_samples": _N, "duration": _N / 16000},
    None,
    "schema",
    r"'media.num_samples' is 1000000000000",
  ),
  # Samples claimed without an audio dtype: no length check applied.
  "num_samples_without_audio": (
    "text",
    {"media.num_samples": _N},
    None,
    "schema",
    r"'media.num_samples' is 1000000000000",
  ),
  # One chunk of a billion seconds' windows.
  "chunk_windows": (
    "audio",
    {"media.num_samples": _N, "duration": _N / 16000, "media.chunk_windows": -(-_N // 3200)},
    None,
    "schema",
    r"'media.chunk_windows' is 312500000",
  ),
  # A million chunks in header and manifest alike, in a shard of a handful of records: what a
  # truncated shard looks like, so it is reported as one.
  "chunks": (
    "audio",
    {"media.num_samples": 10**6 * _SPAN, "duration": 10**6 * _SPAN / 16000, "media.chunks": 10**6},
    10**6 + 1,
    "corrupt",
    r"cannot read records \[\d+, 1000\d+\): the shard holds \d+ records",
  ),
  "duration_text": ("text", {"duration": 1e9}, None, "schema", r"'duration' is 1000000000.0"),
  "duration_video": ("video", {"duration": 1e9}, None, "schema", r"'media.chunks' is 1"),
  # A text-only episode whose one late word stretches it to a billion seconds.
  "word_times": (
    "text",
    {"duration": 1e9 + 0.2, "model_words": [[0.2, 0.3, "a"], [1e9, 1e9 + 0.1, "late"]]},
    None,
    "schema",
    r"'model_words'\[1\].*1000000000.0",
  ),
}


_VICTIMS = {
  "audio": lambda eid: known_episode(eid, windows=10, video=False),
  "text": _text_episode,
  "video": _video_episode,
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_is_raised_or_counted_promptly_in_bounded_memory(tmp_path, case):
  kind, fields, records, reason, message = CRAFTED[case]
  ep_lib.write_dataset([known_episode("good", windows=10, video=False), _VICTIMS[kind]("bad")], tmp_path / "ds")
  _craft(tmp_path / "ds", "bad", fields, records)
  # The pipeline raises it in raise mode and counts it under its reason in skip mode, promptly.
  out = _run_pipeline(tmp_path / "ds")
  assert out["raised"] is not None, "raise mode never raised"
  assert out["raised"][0] == reason and "episode 'bad'" in out["raised"][1], out["raised"]
  skipped = {k: v for k, v in out["skip"].items() if k.startswith("skipped_") and v}
  assert set(skipped) == {f"skipped_{reason}"} and out["skip"]["windows"] > 0, out["skip"]
  # The reader's error names the file, record and field; the good episode still reads.
  reader = ep_lib.EpisodeReader(tmp_path / "ds")
  where = r"ds/episodes-00000-of-00001.array_record record \d+ \(episode 'bad'\)"
  with pytest.raises(DataError, match=rf"{where}: .*{message}") as e:
    reader.header(1)
  assert e.value.reason == reason
  assert reader.read(0).id == "good"


def _odd_audio(eid: str, samples: int) -> Episode:
  rng = np.random.default_rng(samples)
  audio = [rng.integers(-3000, 3000, samples).astype(np.int16) for _ in range(2)]
  return Episode(id=eid, duration=samples / 16000, user_audio=audio[0], model_audio=audio[1])


def test_header_checks_are_the_writers_layout_no_looser_and_no_stricter(tmp_path):
  """Every episode the writer lays out reads back, at chunk boundaries too; the smallest
  disagreement with that layout does not."""
  eps = [
    known_episode("av", windows=70, video=True),
    known_episode("a25", windows=25, video=False),  # exactly one default chunk
    _odd_audio("a1", 80_001),  # one sample into a second default chunk
    _odd_audio("a0", 79_999),
    _text_episode("t"),
    _video_episode("v"),
    Episode(id="empty", duration=0.5),
    Episode(id="late", duration=60.0 + 0.3, model_words=[Word(0.3, 0.4, "a")]),  # a minute after its text
  ]
  for chunk_seconds in (0.2, 1.0, 5.0, 60.0):
    ep_lib.write_dataset(eps, tmp_path / f"ds{chunk_seconds}", chunk_seconds=chunk_seconds)
    reader = ep_lib.EpisodeReader(tmp_path / f"ds{chunk_seconds}")
    assert [reader.read(i).id for i in range(len(reader))] == [e.id for e in eps]
  for d in ("conversations", "video", "text"):
    reader = ep_lib.EpisodeReader(ROOT / "data" / "sample" / d)
    for i in range(len(reader)):
      reader.header(i)
  with pytest.raises(ValueError, match="chunk_seconds"):
    ep_lib.write_dataset(eps, tmp_path / "huge", chunk_seconds=61.0)
  with pytest.raises(DataError, match="'duration' is 60.5"):
    ep_lib.write_dataset([Episode(id="later", duration=60.5, model_words=[Word(0.3, 0.4, "a")])], tmp_path / "x")
  # A sample or a window past the chunks, chunks one window short, a chunk of a text-only episode,
  # a tail past the longest gap, samples without a dtype.
  ds = tmp_path / "ds5.0"
  for eid, fields in (
    ("a25", {"media.num_samples": 80_001, "duration": 80_001 / 16000}),
    ("a1", {"media.num_samples": 160_001, "duration": 160_001 / 16000}),
    ("a0", {"media.chunk_windows": 24}),
    ("v", {"duration": 5.2}),
    ("t", {"media.chunks": 1}),
    ("late", {"duration": 60.45}),
    ("a25", {"media.audio_dtype": None}),
  ):
    _craft(ds, eid, fields)
    reader = ep_lib.EpisodeReader(ds)
    i = [e.id for e in reader.episodes].index(eid)
    with pytest.raises(DataError, match=f"episode '{eid}'") as e:
      reader.header(i)
    assert e.value.reason == "schema", (eid, fields, e.value)
    ep_lib.write_dataset(eps, ds, chunk_seconds=5.0)


def test_alignment_is_linear_in_text_that_waits_for_room():
  """A word much longer than K_max waits over thousands of micro-turns: alignment copies its tokens
  once, not once per micro-turn (a megabyte of text took 15 s that way)."""
  tok = ByteTokenizer()
  spec = AlignSpec(k_max=8, text_only_k_max=32, frame_height=80, frame_width=80, vocab_size=tok.vocab_size)
  ep = Episode(id="long", duration=3600.0, model_words=[Word(0.3, 0.4, "x" * 1_000_000)])
  start = time.perf_counter()
  layout = align(ep, tok, spec, where="long")
  assert time.perf_counter() - start < 5.0
  assert len(layout) == 17_999 and layout.carried_over == 1_000_000 - 17_999 * 32
  assert all(len(ids) == 33 for ids in layout.out_text)


def _manifest_with_shard(tmp_path: pathlib.Path, shard: str) -> pathlib.Path:
  ep_lib.write_dataset([known_episode("e", windows=10, video=False)], tmp_path / "ds")
  written = next((tmp_path / "ds").glob("*.array_record"))
  if shard.startswith("sub/"):
    (tmp_path / "ds" / "sub").mkdir()
  if shard == "sub/" + written.name:
    written.rename(tmp_path / "ds" / shard)
  else:
    (tmp_path / "elsewhere.array_record").write_bytes(written.read_bytes())
  if shard == "link":
    (tmp_path / "ds" / "link").symlink_to(tmp_path / "elsewhere.array_record")
  path = tmp_path / "ds" / ep_lib.MANIFEST
  manifest = json.loads(path.read_text())
  manifest["shards"] = [shard]
  manifest["episodes"][0]["shard"] = shard
  path.write_text(json.dumps(manifest))
  return path


@pytest.mark.parametrize(
  "shard",
  [
    "../elsewhere.array_record",
    "/tmp/elsewhere.array_record",
    "sub/../../elsewhere.array_record",
    "link",  # a symlink inside the directory to a file outside it
  ],
)
def test_manifest_shard_outside_its_directory_is_a_schema_error(tmp_path, shard):
  path = _manifest_with_shard(tmp_path / "bad", shard)
  with pytest.raises(DataError, match=rf"{path}: .*shard {re.escape(repr(shard))} .*outside") as e:
    ep_lib.EpisodeReader(path.parent)
  assert e.value.reason == "schema" and e.value.where == str(path)
  # A shard in a subdirectory of the dataset is inside it.
  ok = _manifest_with_shard(tmp_path / "ok", "sub/episodes-00000-of-00001.array_record")
  assert ep_lib.EpisodeReader(ok.parent).read(0).id == "e"


def _inspect(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "data_pipelines.inspect", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("which", ["mixture", "out", "config", "tokenizer"])
def test_inspect_cli_on_a_mistyped_path_fails_in_one_line_and_creates_nothing(tmp_path, which):
  missing = tmp_path / "mistyped"
  args = {
    "mixture": ["--config=experiments/sample_cpu.py", f"--config.data.mixture={missing}"],
    "out": ["--config=experiments/sample_cpu.py", f"--out={missing / 'row.png'}"],
    "config": [f"--config={missing / 'tiny.py'}"],
    "tokenizer": [
      "--config=experiments/sample_cpu.py",
      f"--config.data.tokenizer=sentencepiece:{missing / 'tok.model'}",
    ],
  }[which]
  proc = _inspect(*args)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode != 0
  assert len(lines) == 1 and str(missing) in lines[0], proc.stderr[-3000:]
  assert proc.stdout == ""  # the paths are checked before any row is made
  assert not missing.exists()
