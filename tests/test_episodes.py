"""The episode pipeline: alignment, determinism, resume, processes, workers, bad data, mixtures."""

import collections
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

import data_pipelines
from data_pipelines import episode as ep_lib
from data_pipelines.align import AlignSpec, align
from data_pipelines.contract import SAMPLE_RATE as SR
from data_pipelines.contract import SAMPLES_PER_MICRO_TURN as MT
from data_pipelines.contract import Kind, check_batch
from data_pipelines.episode import DataError, Episode, Event, Word
from data_pipelines.tokenizer import ByteTokenizer
from tests.helpers import ROOT, run_main, tiny_config
from tmlx import config as config_lib


def _tone(n: int, freq: float, level: float) -> np.ndarray:
  return (level * np.sin(2 * np.pi * freq * np.arange(n) / SR) * 32767).astype(np.int16)


def known_episode(eid: str = "known", windows: int = 12, video: bool = True) -> Episode:
  """User speaks only in window 3, the model only in window 5; words, events and frames at known times."""
  n = windows * MT
  user = np.zeros(n, np.int16)
  model = np.zeros(n, np.int16)
  user[3 * MT : 4 * MT] = _tone(MT, 440, 0.5)
  model[5 * MT : 6 * MT] = _tone(MT, 880, 0.5)
  frames = times = None
  if video:
    times = np.arange(windows) * 0.2 + 0.05
    frames = np.zeros((windows, 80, 80, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(windows)[:, None, None] * 10  # frame of window t has red = 10 t
  return Episode(
    id=eid,
    duration=windows * 0.2,
    user_audio=user,
    model_audio=model,
    frames=frames,
    frame_times=times,
    user_words=[Word(0.61, 0.79, "question")],
    model_words=[
      Word(0.45, 0.55, "hello"),  # window 2 → O_1
      Word(0.61, 0.7, "a"),  # window 3 → O_2
      Word(0.65, 0.9, "there"),  # window 3 → O_2
      Word(1.0, 1.3, "extraordinarily"),  # window 5 → O_4, overflows K_max = 8 into O_5, O_6
    ],
    typed_text=[Event(0.3, "hi")],  # window 1 → I_1
    bg_calls=[Event(1.41, "time?")],  # window 7 → O_6 (after the overflow)
    bg_results=[Event(1.85, "14:05")],  # window 9 → I_9
  )


def test_alignment_puts_every_word_in_its_micro_turn():
  tok = ByteTokenizer()
  spec = AlignSpec(k_max=8, text_only_k_max=32, frame_height=80, frame_width=80, vocab_size=tok.vocab_size)
  layout = align(known_episode(), tok, spec, where="known")
  out = [tok.decode(ids) for ids in layout.out_text]
  assert out[:8] == [
    "<eot>",
    "hello<eot>",
    " a there<eot>",
    "<eot>",
    " extraor<eot>",
    "dinarily<eot>",
    "<bg_call>time?</bg_call><eot>",
    "<eot>",
  ]
  assert layout.typed_text[1] == [tok.encode("hi")] and layout.bg_results[9] == [tok.encode("14:05")]
  assert sum(map(bool, layout.typed_text + layout.bg_results)) == 2
  assert list(layout.frame) == list(range(11)) and layout.carried_over == 0
  assert len(layout) == 11  # 12 windows: O_t needs window t+1


def _episode_config(mixture: str, **data):
  c = tiny_config("tiny")
  c.data.source = "episodes"
  c.data.mixture = mixture
  c.data.max_patches = 64
  c.data.seq_len = 256
  c.data.on_error = "raise"
  for k, v in data.items():
    c.data[k] = v
  return c


def _micro_turns(row: dict, kind: Kind) -> list[tuple[int, np.ndarray]]:
  """(micro-turn, positions of `kind`) for every micro-turn of every segment of the row."""
  out = collections.defaultdict(list)
  for p in np.flatnonzero(row["kind"] == kind):
    out[int(row["segment_ids"][p]), int(row["micro_turn"][p])].append(p)
  return [(t, np.array(ps)) for (_, t), ps in out.items()]


def test_rows_carry_the_aligned_text_audio_and_frames(tmp_path):
  ep_lib.write_dataset([known_episode()], tmp_path / "ds")
  c = _episode_config(str(tmp_path / "ds"), max_window=0)
  source = data_pipelines.make_source(c)
  tok = ByteTokenizer()
  seen = set()
  for r in range(6):
    row = source.row(0, r)
    check_batch(row, data_pipelines.row_spec(c), c.model.vocab_size, where=f"row {r}")
    text = _micro_turns(row, Kind.TEXT_OUT)
    for t, ps in text:
      want = {1: "hello<eot>", 2: " a there<eot>", 6: "<bg_call>time?</bg_call><eot>"}.get(t)
      if want:
        assert tok.decode(row["tokens"][ps].tolist()) == want
      seen.add(t)
    # Loud dMel where the tone is: user window 3 → I_3, model window 5 → O_4 (from the second position:
    # the first one after a loud window still hears its end through the 50 ms causal window).
    for kind, loud_at in ((Kind.AUDIO_IN, 3), (Kind.AUDIO_OUT, 4)):
      for t, ps in _micro_turns(row, kind):
        assert len(ps) == 4
        level = row["dmel"][ps[1:]].mean()
        assert (level > 4) == (t == loud_at), (kind, t, level)
    for t, ps in _micro_turns(row, Kind.AUDIO_OUT):
      assert (row["mel"][ps[1:]].astype(np.float32).mean() > -0.8) == (t == 4)
    for t, ps in _micro_turns(row, Kind.PATCH):
      assert len(ps) == 4
      assert (row["patches"][row["patch_index"][ps]][..., 0] == 10 * t).all()
      assert row["patch_rowcol"][row["patch_index"][ps]].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # Each segment is one window of consecutive micro-turns, with positions from 0.
    for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      ps = np.flatnonzero(row["segment_ids"] == s)
      assert (row["positions"][ps] == np.arange(len(ps))).all()
      mts = row["micro_turn"][ps]
      assert (np.diff(mts) >= 0).all() and (np.diff(np.unique(mts)) == 1).all()
  assert seen >= {1, 2, 6}


def test_text_only_episodes_have_no_audio_positions(tmp_path):
  words = [
    Word(0.1 * i, 0.1 * i + 0.05, w) for i, w in enumerate("the quick brown fox jumps over the lazy dog".split())
  ]
  text_ep = Episode(id="doc", duration=1.2, model_words=words, typed_text=[Event(0.25, "go on")])
  ep_lib.write_dataset([text_ep], tmp_path / "text")
  c = _episode_config(str(tmp_path / "text"))
  row = data_pipelines.make_source(c).row(3, 0)
  kinds = set(np.unique(row["kind"]).tolist())
  assert kinds == {Kind.PAD, Kind.MT, Kind.TEXT_IN, Kind.TEXT_OUT}
  text = ByteTokenizer().decode(row["tokens"][row["kind"] == Kind.TEXT_OUT].tolist())
  assert "lazy dog" in text.replace("<eot>", "") or "the quick" in text.replace("<eot>", "")


def _two_datasets(tmp_path) -> str:
  rng = np.random.default_rng(0)
  eps = []
  for i in range(4):
    e = known_episode(f"c{i}", windows=int(rng.integers(8, 30)), video=i % 2 == 0)
    e.user_audio = (e.user_audio + rng.normal(0, 300, e.user_audio.shape)).astype(np.int16)
    eps.append(e)
  ep_lib.write_dataset(eps, tmp_path / "a", episodes_per_shard=2)
  docs = [
    Episode(id=f"d{i}", duration=3.0, model_words=[Word(0.2 * j, 0.2 * j + 0.1, f"w{i}{j}") for j in range(14)])
    for i in range(3)
  ]
  ep_lib.write_dataset(docs, tmp_path / "b")
  return f"{tmp_path / 'a'}:0.75,{tmp_path / 'b'}:0.25"


def _batches(config, **kw):
  return list(data_pipelines.make_dataset(config, **kw))


def _same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_rows_are_pure_functions_of_seed_step_and_row(tmp_path):
  c = _episode_config(_two_datasets(tmp_path))
  a, b = data_pipelines.make_source(c), data_pipelines.make_source(c)
  for step, r in ((0, 0), (5, 3), (17, 1)):
    _same(a.row(step, r), b.row(step, r))
  b.row(2, 2)  # a different cache history changes nothing
  _same(a.row(5, 3), b.row(5, 3))
  assert a.row(0, 0)["tokens"].tobytes() != a.row(0, 1)["tokens"].tobytes()
  c.seed += 1
  assert data_pipelines.make_source(c).row(0, 0)["tokens"].tobytes() != a.row(0, 0)["tokens"].tobytes()


def test_global_batch_is_the_same_for_1_and_2_processes_and_0_and_2_workers(tmp_path):
  c = _episode_config(_two_datasets(tmp_path))
  c.data.global_batch_size = 4
  one = _batches(c, start_step=0, num_steps=3, process_index=0, process_count=1)
  halves = [_batches(c, start_step=0, num_steps=3, process_index=p, process_count=2) for p in range(2)]
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
  c.data.num_workers = 2
  workers = _batches(c, start_step=0, num_steps=3, process_index=0, process_count=1)
  assert len(one) == len(workers) == 3
  for step in range(3):
    batch, stats = one[step]
    joined = {k: np.concatenate([halves[0][step][0][k], halves[1][step][0][k]]) for k in batch}
    _same(batch, joined)
    _same(batch, workers[step][0])
    assert int(stats["windows"]) == int(halves[0][step][1]["windows"]) + int(halves[1][step][1]["windows"])
    _same(stats, workers[step][1])


def test_resume_at_step_k_gives_the_uninterrupted_batches(tmp_path):
  c = _episode_config(_two_datasets(tmp_path))
  full = _batches(c, start_step=0, num_steps=6, process_index=0, process_count=1)
  resumed = _batches(c, start_step=4, num_steps=6, process_index=0, process_count=1)
  assert len(resumed) == 2
  for a, b in zip(full[4:], resumed):
    _same(a[0], b[0])


def test_mixture_proportions_hold_over_10000_rows(tmp_path):
  c = _episode_config(_two_datasets(tmp_path))
  source = data_pipelines.make_source(c)
  rows = [(s, r) for s in range(1250) for r in range(8)]
  firsts = [source.plan(s, r, read_media=False)[0][0].dataset for s, r in rows]
  assert firsts[:50] == [source.dataset_of(s, r) for s, r in rows[:50]]
  share = np.bincount(firsts, minlength=2) / len(rows)
  assert abs(share[0] - 0.75) < 0.02 and abs(share[1] - 0.25) < 0.02, share


def test_a_staged_mixture_switches_weights_at_its_step():
  """Stages by step: conversations only before step 3, then text 3:1 over conversations; the row
  plan draws its dataset by the stage of the row's step, and stays a pure function of the indices."""
  c = _episode_config("data/sample/conversations;3=data/sample/text:3,data/sample/conversations:1")
  source = data_pipelines.make_source(c)
  assert [r.directory.name for r in source.readers] == ["conversations", "text"]
  before = [source.dataset_of(s, r) for s in range(3) for r in range(200)]
  after = [source.dataset_of(s, r) for s in range(3, 6) for r in range(200)]
  assert set(before) == {0}
  assert abs(np.mean(after) - 0.75) < 0.05, np.mean(after)
  firsts = [source.plan(s, r, read_media=False)[0][0].dataset for s in (2, 3) for r in range(20)]
  assert firsts == [source.dataset_of(s, r) for s in (2, 3) for r in range(20)]
  again = data_pipelines.make_source(c)
  assert [again.dataset_of(4, r) for r in range(50)] == after[200:250]
  # The stages are part of the data spec: another switching step is another stream of rows.
  other = data_pipelines.make_source(
    _episode_config("data/sample/conversations;4=data/sample/text:3,data/sample/conversations:1")
  )
  assert other.fingerprint != source.fingerprint
  single = data_pipelines.make_source(_episode_config("data/sample/conversations:1,data/sample/text:1"))
  assert (
    single.fingerprint
    == data_pipelines.make_source(_episode_config("data/sample/conversations,data/sample/text")).fingerprint
  )


@pytest.mark.parametrize(
  "mixture, message",
  [
    ("data/sample/text;data/sample/conversations", r"stage 2 'data/sample/conversations' has no STEP="),
    ("data/sample/text;x=data/sample/conversations", r"stage 2 .*: expected STEP=DIR:WEIGHT,\.\.\. with a step number"),
    ("data/sample/text;5=a:1;5=b:1", r"stage 3 '5=b:1' starts at step 5, not after stage 2's 5"),
    ("10=data/sample/text", r"the first stage starts at step 10; it must start at 0"),
    ("data/sample/text;5=", r"stage 2 names no dataset"),
    ("data/sample/text;5=data/sample/conversations:inf", r"weight inf of '.*conversations' must be a finite number"),
  ],
)
def test_a_bad_staged_mixture_is_refused_naming_the_stage(mixture, message):
  c = _episode_config(mixture)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, 8)


def test_mixture_spec_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="data.mixture.*weight 'x'"):
    data_pipelines.make_source(_episode_config(f"{tmp_path}:x"))
  with pytest.raises(FileNotFoundError, match="no episode manifest"):
    data_pipelines.make_source(_episode_config(str(tmp_path / "missing")))


# -- bad data ------------------------------------------------------------------------------------


def _write_raw(directory: pathlib.Path, episodes: list[Episode]) -> None:
  """Writes episodes without validating them, as a foreign tool might."""
  directory.mkdir(parents=True)
  name = "episodes-00000-of-00001.array_record"
  w = ArrayRecordWriter(str(directory / name), ep_lib.WRITER_OPTIONS)
  entries, index = [], 0
  for e in episodes:
    records = ep_lib.episode_records(e)
    for r in records:
      w.write(r)
    entries.append(
      {
        "shard": name,
        "index": index,
        "records": len(records),
        "id": e.id,
        "num_micro_turns": e.num_micro_turns,
        "has_audio": True,
        "has_video": False,
      }
    )
    index += len(records)
  w.close()
  (directory / ep_lib.MANIFEST).write_text(json.dumps({"schema": 1, "shards": [name], "episodes": entries}))


def _bad(case: str) -> Episode:
  e = known_episode(case, windows=10, video=False)
  if case == "sample_rate":
    e.sample_rate = 8000
  elif case == "length":
    e.model_audio = e.model_audio[:-400]
  elif case == "non_finite":
    e.user_audio = e.user_audio.astype(np.float32) / 32768
    e.user_audio[1234] = np.nan
  elif case == "range":
    e.model_words = [Word(1.0, 1.2, "late"), Word(2.5, 2.6, "after the end")]
  elif case == "order":
    e.bg_results = [Event(1.0, "b"), Event(0.4, "a")]
  elif case == "token_range":
    e.model_words = [Word(0.5, 0.6, "\u00e9t\u00e9")]
  return e


BAD = {  # reason, record (the good episode takes records 0-1: a header and one chunk), message
  "sample_rate": ("sample_rate", 2, "field 'sample_rate' is 8000"),
  "length": ("length", 3, r"field 'model_audio' of chunk 0 is int16\[31600\]; want <i2\[32000\]"),
  "non_finite": ("non_finite", 3, "field 'user_audio' has 1 NaN/Inf samples"),
  "range": ("timestamps", 2, r"field 'model_words'\[1\] time 2.5 is outside"),
  "order": ("timestamps", 2, r"field 'bg_results'\[1\] time 0.4 comes before"),
  "token_range": ("token_range", 2, "field 'model_words'.*token id 211 >= model.vocab_size=200"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_episodes_raise_naming_file_record_and_field_or_are_counted(tmp_path, case):
  reason, record, message = BAD[case]
  good = known_episode("good", windows=10, video=False)
  _write_raw(tmp_path / "ds", [good, _bad(case)])
  c = _episode_config(str(tmp_path / "ds"))
  c.model.vocab_size = 200  # byte tokens of 'é' (0xC3 + 16) are past it; ASCII letters are not
  source = data_pipelines.make_source(c)
  with pytest.raises(
    DataError, match=rf"ds/episodes-00000-of-00001.array_record record {record} \(episode '{case}'\): {message}"
  ):
    for r in range(20):
      source.row(0, r)
  c.data.on_error = "skip"
  total = collections.Counter()
  for batch, stats in _batches(c, start_step=0, num_steps=4, process_index=0, process_count=1):
    check_batch(batch, data_pipelines.row_spec(c), c.model.vocab_size, where="skip")
    total.update({k: int(v) for k, v in stats.items()})
  assert total[f"skipped_{reason}"] > 0 and total["windows"] > 0
  assert sum(v for k, v in total.items() if k.startswith("skipped_")) == total[f"skipped_{reason}"]


def test_corrupt_chunk_and_truncated_shard(tmp_path):
  eps = [known_episode(f"e{i}", windows=10, video=False) for i in range(3)]
  ep_lib.write_dataset(eps, tmp_path / "ds")
  shard = next((tmp_path / "ds").glob("*.array_record"))
  data = bytearray(shard.read_bytes())
  reader = ep_lib.EpisodeReader(tmp_path / "ds")
  assert reader.read(1).id == "e1"
  # Flip a byte inside the first record's chunk (chunks start after a 64-byte file header and
  # their own 40-byte header): that record alone fails its hash check.
  data[130] ^= 0xFF
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / shard.name).write_bytes(bytes(data))
  (bad / ep_lib.MANIFEST).write_bytes((tmp_path / "ds" / ep_lib.MANIFEST).read_bytes())
  reader = ep_lib.EpisodeReader(bad)
  failures = []
  for i in range(3):
    try:
      reader.read(i)
    except DataError as e:
      failures.append((i, e.reason, str(e)))
  assert len(failures) == 1 and failures[0][1] == "corrupt"
  assert f"{shard.name} record {failures[0][0]}" in failures[0][2] and "hash mismatch" in failures[0][2]
  # With the skip policy the pipeline draws around it and counts it.
  c = _episode_config(str(bad), on_error="skip")
  counts = collections.Counter()
  for _, stats in _batches(c, start_step=0, num_steps=3, process_index=0, process_count=1):
    counts.update({k: int(v) for k, v in stats.items()})
  assert counts["skipped_corrupt"] > 0 and counts["windows"] > 0
  # Truncated shard: its records cannot be read.
  (bad / shard.name).write_bytes(shard.read_bytes()[: len(data) // 3])
  with pytest.raises(DataError, match=rf"{shard.name}.*(cannot open shard|cannot read record)"):
    for i in range(3):
      ep_lib.EpisodeReader(bad).read(i)


def test_skip_ratio_above_the_threshold_stops_training(tmp_path):
  from tmlx.faults import DataStats

  stats = DataStats(max_skip_ratio=0.05)
  stats.add({"windows": np.int64(50), "skipped_corrupt": np.int64(3)})  # fewer than 100 draws: no verdict
  stats.add({"windows": np.int64(50), "skipped_corrupt": np.int64(2)})
  assert stats.metrics()["data/skipped_corrupt"] == 5
  with pytest.raises(RuntimeError, match=r"6 of 106 episode draws.*max_skip_ratio=0.05; by reason: corrupt: 6"):
    stats.add({"windows": np.int64(0), "skipped_corrupt": np.int64(1)})


# -- the committed sample corpus and the inspect CLI ------------------------------------------------


def test_sample_corpus_rows_through_the_tiny_preset():
  c = tiny_config()
  source = data_pipelines.make_source(c)
  tok = ByteTokenizer()
  kinds, text, datasets = set(), "", set()
  for r in range(24):
    windows, stats = source.plan(0, r)
    datasets.add(windows[0].dataset)
    row = source.row(0, r)
    check_batch(row, data_pipelines.row_spec(c), c.model.vocab_size, where=f"sample row {r}")
    kinds |= set(np.unique(row["kind"]).tolist())
    text += tok.decode(row["tokens"][np.isin(row["kind"], (Kind.TEXT_IN, Kind.TEXT_OUT))].tolist())
  assert kinds == set(Kind)
  assert datasets == {0, 1, 2}
  assert "<eot>" in text and "<user_text>" in text


def test_inspect_cli_renders_a_row_and_prints_stats(tmp_path):
  out = tmp_path / "row.png"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "data_pipelines.inspect",
      "--config=experiments/sample_cpu.py",
      "--row=2",
      "--rows=3",
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "stats over 3 row(s) of 256 positions" in proc.stdout and "padding_ratio" in proc.stdout
  assert "AUDIO_IN" in proc.stdout and "O: " in proc.stdout
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000

  # Through the entry point: half the episodes are bad, so the run stops once 100 draws are made.
  _write_raw(
    tmp_path / "half_bad",
    [known_episode("good", 10, False), _bad("sample_rate")],
  )
  proc = run_main(
    "experiments/sample_cpu.py:tiny",
    tmp_path / "run",
    f"--config.data.mixture={tmp_path / 'half_bad'}",
    "--config.data.max_skip_ratio=0.1",
    "--config.train.num_steps=20",
    "--config.checkpoint.every=0",
  )
  assert proc.returncode != 0
  assert "episode draws were bad and skipped" in proc.stderr and "sample_rate:" in proc.stderr


@pytest.mark.parametrize("causal", [True, False])
def test_windows_across_chunk_boundaries_equal_the_whole_episode(tmp_path, causal):
  """Rows read only the chunks a window needs; their features equal those of the whole arrays."""
  from data_pipelines import dmel, video

  rng = np.random.default_rng(1)
  e = known_episode("long", windows=70, video=True)
  e.user_audio = rng.normal(0, 3000, e.user_audio.shape).astype(np.int16)
  e.model_audio = rng.normal(0, 3000, e.model_audio.shape).astype(np.int16)
  e.frames = rng.integers(0, 256, e.frames.shape, dtype=np.uint8)
  ep_lib.write_dataset([e], tmp_path / "ds", chunk_seconds=1.0)  # 14 chunks of 5 windows
  c = _episode_config(str(tmp_path / "ds"), audio_causal=causal)
  source = data_pipelines.make_source(c)
  checked = 0
  for r in range(6):
    windows, _ = source.plan(0, r)
    row = source.row(0, r)
    for segment, w in enumerate(windows, start=1):
      assert w.media.sample_offset < 3200 * w.start or w.media.sample_offset == 0
      assert len(w.media.user_audio) < len(e.user_audio) or w.length > 60
      at = row["segment_ids"] == segment
      frames = slice(16 * w.start, 16 * (w.start + w.length))
      heard = dmel.dmel_bins(e.user_audio, causal=causal)[frames]
      spoken = dmel.log_mel(e.model_audio, causal=causal)[16 * (w.start + 1) : 16 * (w.start + 1 + w.length)]
      np.testing.assert_array_equal(row["dmel"][at & (row["kind"] == Kind.AUDIO_IN)].reshape(-1, 80), heard)
      mel = dmel.normalize(spoken).astype(np.float16)
      np.testing.assert_array_equal(row["mel"][at & (row["kind"] == Kind.AUDIO_OUT)].reshape(-1, 80), mel)
      patch_at = at & (row["kind"] == Kind.PATCH)
      want = np.concatenate([video.patchify(e.frames[t])[0] for t in range(w.start, w.start + w.length)])
      np.testing.assert_array_equal(row["patches"][row["patch_index"][patch_at]], want)
      checked += 1
  assert checked >= 6
