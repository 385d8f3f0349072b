"""Dataset statistics (`data_pipelines.stats`): one episode's figures by hand, a dataset's summed from
its episodes or taken from its manifest, the report, and the command's one-line errors."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import stats
from data_pipelines.contract import SAMPLE_RATE as SR
from data_pipelines.episode import MANIFEST, Episode, Event, Word, write_dataset
from tests.helpers import ROOT

ZERO = dict.fromkeys(stats.STAT_KEYS, 0)


def _audio(seconds: float) -> np.ndarray:
  return np.zeros(round(seconds * SR), np.int16)


def _episodes() -> list[Episode]:
  """Two episodes with audio (one with video) and a text-only one, all valid."""
  talk = Episode(
    "talk",
    2.0,
    _audio(2.0),
    _audio(2.0),
    user_words=[Word(0.0, 0.5, "hi"), Word(0.4, 1.0, "there")],
    model_words=[Word(0.8, 1.6, "hello")],
    typed_text=[Event(0.2, "typed")],
  )
  video = Episode(
    "video",
    1.5,
    _audio(1.5),
    _audio(1.5),
    frames=np.zeros((3, 8, 8, 3), np.uint8),
    frame_times=np.array([0.1, 0.5, 1.0]),
    user_words=[Word(0.1, 0.3, "look")],
    bg_calls=[Event(0.5, "search")],
    bg_results=[Event(1.2, "found")],
  )
  text = Episode("text", 2.0, model_words=[Word(0.2, 0.6, "just"), Word(0.8, 1.5, "text")])
  return [talk, video, text]


def _dataset(tmp_path) -> tuple:
  eps = _episodes()
  directory = tmp_path / "ds"
  write_dataset(eps, directory)
  return directory, eps


def _one_line_exit(capsys, argv: list[str]) -> str:
  with pytest.raises(SystemExit) as e:
    stats.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"{stats.PROG}: error: "), err
  return err


def test_episode_stats_by_hand():
  ep = Episode(
    "hand",
    10.0,
    _audio(10.0),
    _audio(10.0),
    frames=np.zeros((5, 4, 4, 3), np.uint8),
    frame_times=np.arange(5) * 2.0,
    # user: [0, 3] (three overlapping words, one inside another) and [8, 9] = 4 s
    user_words=[Word(0.0, 2.0, "a"), Word(0.5, 1.0, "b"), Word(1.0, 3.0, "c"), Word(8.0, 9.0, "d")],
    # model: [2.5, 5] and [9.5, 10] (clipped from 10.5) = 3 s; an empty word adds nothing
    model_words=[Word(2.5, 4.0, "e"), Word(3.5, 5.0, "f"), Word(6.0, 6.0, "g"), Word(9.5, 10.5, "h")],
    typed_text=[Event(1.0, "t")],
    bg_calls=[Event(2.0, "c1"), Event(3.0, "c2")],
    bg_results=[Event(4.0, "r")],
  )
  # both: [0, 5], [8, 9], [9.5, 10] = 6.5 s spoken, so 3.5 s of silence; overlap [2.5, 3] = 0.5 s
  assert stats.episode_stats(ep) == {
    "episodes": 1,
    "seconds": 10.0,
    "audio_seconds": 10.0,
    "video_seconds": 10.0,
    "text_only_seconds": 0.0,
    "video_frames": 5,
    "user_speech_seconds": 4.0,
    "model_speech_seconds": 3.0,
    "overlap_seconds": 0.5,
    "silence_seconds": 3.5,
    "user_words": 4,
    "model_words": 4,
    "typed_text": 1,
    "bg_calls": 2,
    "bg_results": 1,
  }


def test_episode_stats_without_audio_has_no_speech_figures():
  text = _episodes()[2]
  s = stats.episode_stats(text)
  assert s["text_only_seconds"] == s["seconds"] == 2.0 and s["audio_seconds"] == s["video_seconds"] == 0
  assert s["user_speech_seconds"] == s["model_speech_seconds"] == s["overlap_seconds"] == s["silence_seconds"] == 0
  assert s["model_words"] == 2 and s["user_words"] == 0


def test_add_sums_key_wise_and_rounds():
  total = stats.add({"n": 1, "a": 0.1}, {"a": 0.2, "b": 2})
  assert total == {"a": 0.3, "b": 2, "n": 1} and list(total) == ["a", "b", "n"]
  assert isinstance(total["n"], int)


def test_stats_of_a_dataset_without_stats_in_its_manifest_read_every_episode(tmp_path, capsys):
  directory, eps = _dataset(tmp_path)
  assert "stats" not in json.loads((directory / MANIFEST).read_text())
  assert stats.main([str(directory), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["stats"] == functools.reduce(stats.add, map(stats.episode_stats, eps), ZERO)
  assert result["stats"]["episodes"] == 3 and result["stats"]["video_frames"] == 3
  assert result["skipped"] is None and result["warnings"] is None and result["shards"] == 1
  report = stats.format_stats(result)
  assert "episodes: 3 in 1 shard(s)" in report
  assert "skip reasons: not recorded in this manifest" in report
  assert "warnings: not recorded in this manifest" in report


def test_stats_from_the_manifest_and_the_skip_reasons(tmp_path, capsys):
  directory, eps = _dataset(tmp_path)
  manifest = json.loads((directory / MANIFEST).read_text())
  recorded = {**functools.reduce(stats.add, map(stats.episode_stats, eps), ZERO), "episodes": 99}
  manifest.update(stats=recorded, skipped={"transcript": 2, "audio": 1}, warnings={})
  (directory / MANIFEST).write_text(json.dumps(manifest))
  for shard in manifest["shards"]:  # the manifest's stats are all it needs
    (directory / shard).unlink()
  assert stats.main([str(directory)]) == 0
  report = capsys.readouterr().out
  assert "episodes: 99 in 1 shard(s)" in report
  lines = report.splitlines()
  at = lines.index("skipped: 3")
  assert lines[at + 1].split()[:2] == ["transcript", "2"] and lines[at + 1].endswith("#" * 27)
  assert lines[at + 2].split()[:2] == ["audio", "1"] and lines[at + 2].endswith(" " + "#" * 13)
  assert lines[at + 3] == "warnings: 0"


def test_report_of_nothing_says_n_a():
  report = stats.format_stats({"stats": dict(ZERO), "skipped": {}, "warnings": None, "shards": 0})
  lines = report.splitlines()
  assert "  user speech      n/a" in lines and "  silence          n/a" in lines
  assert "video: n/a of the time, n/a frames per video second" in lines
  assert "skipped: 0" in lines and "warnings: not recorded in this manifest" in lines


def test_plot(tmp_path, capsys):
  directory, _ = _dataset(tmp_path)
  out = tmp_path / "stats.png"
  assert stats.main([str(directory), f"--plot={out}"]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  err = _one_line_exit(capsys, [str(directory), f"--plot={tmp_path / 'no' / 'stats.png'}"])
  assert "no directory" in err


def test_bad_command_lines_fail_in_one_line(tmp_path, capsys):
  directory, _ = _dataset(tmp_path)
  assert "got 0 arguments" in _one_line_exit(capsys, [])
  assert "got 2 arguments" in _one_line_exit(capsys, [str(directory), str(directory)])
  (directory / MANIFEST).write_text("{not json")
  assert "malformed manifest" in _one_line_exit(capsys, [str(directory)])
  (directory / MANIFEST).write_text(json.dumps({"schema": 1, "shards": [], "episodes": [], "skipped": [1]}))
  assert "'skipped'" in _one_line_exit(capsys, [str(directory)])


def test_a_directory_without_a_manifest_fails_in_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  done = subprocess.run(
    [sys.executable, "-m", "data_pipelines.inspect", "stats", str(empty)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and str(empty) in lines[0] and "no episode manifest" in lines[0], done.stderr
  assert not done.stdout
