"""Transcript parsers, MP4 frames, the audio/video/text dataset builders and the committed sample corpus."""

import json
import pathlib

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import build, video
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import DataError, EpisodeReader, Event, Word
from data_pipelines.transcripts import load_transcript
from tests.helpers import run_build

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

USER = [Word(0.2, 0.45, "hi"), Word(0.5, 0.8, "there")]
MODEL = [Word(1.2, 1.5, "hello"), Word(1.55, 1.8, "friend")]
EVENTS = {
  "typed_text": [Event(0.9, "typed hi")],
  "bg_calls": [Event(1.0, "time?")],
  "bg_results": [Event(1.1, "14:05")],
}


def write_json(path, user=USER, model=MODEL, events=EVENTS):
  doc = {
    "user": [{"word": w.text, "start": w.start, "end": w.end} for w in user],
    "model": [{"word": w.text, "start": w.start, "end": w.end} for w in model],
  }
  doc.update({k: [{"time": e.time, "text": e.text} for e in v] for k, v in events.items()})
  path.write_text(json.dumps(doc))
  return path


def write_textgrid(path, user=USER, model=MODEL, events=EVENTS, xmax=2.0):
  """A long-format TextGrid written by hand, with the empty intervals between words that Praat keeps."""
  lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0", f"xmax = {xmax}", "tiers? <exists>"]
  lines.append(f"size = {2 + len(events)}")
  lines.append("item []:")
  for n, (name, words) in enumerate((("user", user), ("model", model)), 1):
    intervals, t = [], 0.0
    for w in words:
      if w.start > t:
        intervals.append((t, w.start, ""))
      intervals.append((w.start, w.end, w.text))
      t = w.end
    intervals.append((t, xmax, ""))
    lines += [f"    item [{n}]:", '        class = "IntervalTier"', f'        name = "{name}"', "        xmin = 0"]
    lines += [f"        xmax = {xmax}", f"        intervals: size = {len(intervals)}"]
    for i, (a, b, text) in enumerate(intervals, 1):
      lines += [
        f"        intervals [{i}]:",
        f"            xmin = {a}",
        f"            xmax = {b}",
        f'            text = "{text}"',
      ]
  for n, (name, items) in enumerate(events.items(), 3):
    lines += [f"    item [{n}]:", '        class = "TextTier"', f'        name = "{name}"', "        xmin = 0"]
    lines += [f"        xmax = {xmax}", f"        points: size = {len(items)}"]
    for i, e in enumerate(items, 1):
      lines += [f"        points [{i}]:", f"            number = {e.time}", f'            mark = "{e.text}"']
  path.write_text("\n".join(lines) + "\n")
  return path


def write_ctm(path, user=USER, model=MODEL, channels=("A", "B")):
  lines = [";; a comment", ""]
  for channel, words in zip(channels, (user, model)):
    lines += [f"utt {channel} {w.start:.3f} {w.end - w.start:.3f} {w.text} 0.9" for w in words]
  path.write_text("\n".join(lines) + "\n")
  return path


def tone(seconds, rate, spans, freq=440.0):
  """A sine at `freq` inside each (start, end) span, silence elsewhere."""
  t = np.arange(round(seconds * rate)) / rate
  on = np.zeros_like(t, dtype=bool)
  for a, b in spans:
    on |= (t >= a) & (t < b)
  return (0.5 * np.sin(2 * np.pi * freq * t) * on).astype(np.float32)


def stereo(seconds=2.0, rate=SAMPLE_RATE):
  """User speaks in 0.2-0.8 s, the model in 1.2-1.8 s (as the transcripts say)."""
  return np.stack([tone(seconds, rate, [(0.2, 0.8)]), tone(seconds, rate, [(1.2, 1.8)], 660.0)], axis=1)


def energy(audio, a, b):
  return float(np.mean(audio[round(a * SAMPLE_RATE) : round(b * SAMPLE_RATE)].astype(np.float64) ** 2))


def test_json_textgrid_and_ctm_give_the_same_words(tmp_path):
  parsed = {
    "json": load_transcript(write_json(tmp_path / "a.json")),
    "textgrid": load_transcript(write_textgrid(tmp_path / "a.TextGrid")),
    "ctm": load_transcript(write_ctm(tmp_path / "a.ctm")),
  }
  for name, t in parsed.items():
    for got, want in ((t.user_words, USER), (t.model_words, MODEL)):
      assert [w.text for w in got] == [w.text for w in want], name
      np.testing.assert_allclose([(w.start, w.end) for w in got], [(w.start, w.end) for w in want], atol=1e-9)
  for t in (parsed["json"], parsed["textgrid"]):
    assert (t.typed_text, t.bg_calls, t.bg_results) == (EVENTS["typed_text"], EVENTS["bg_calls"], EVENTS["bg_results"])
  assert parsed["ctm"].bg_calls == []
  lower = tmp_path / "b.textgrid"
  lower.write_text((tmp_path / "a.TextGrid").read_text().replace('"user"', '"spk1"'))
  assert load_transcript(lower, user_tier="spk1").user_words == parsed["textgrid"].user_words
  custom = load_transcript(write_ctm(tmp_path / "c.ctm", channels=("L", "R")), channels={"L": "user", "R": "model"})
  assert [w.text for w in custom.model_words] == ["hello", "friend"]


@pytest.mark.parametrize(
  "name, content, expect",
  [
    ("bad.ctm", "utt A 0.1 0.2 hi\nutt B 0.5 0.3 hello\nutt A 0.9 oops there\n", "line 3"),
    ("fields.ctm", ";; ok\nutt A 0.1 0.2\n", "line 2"),
    ("channel.ctm", "utt C 0.1 0.2 hi\n", "line 1: channel 'C'"),
    ("end.json", '{"user": [{"word": "a", "start": 0, "end": 1}, {"word": "b", "start": 1}]}', "user[1]"),
    ("type.json", '{"model": [{"word": "a", "start": "zero", "end": 1}]}', "model[0].start"),
    ("syntax.json", '{"user": [\n  {"word": "a",, }\n]}', "line 2"),
    ("nobody.json", '{"typed_text": []}', "neither"),
    ("typo.json", '{"user": [], "bg_call": []}', "unknown fields ['bg_call']"),
    ("garbage.TextGrid", "this is not\na textgrid\n", "TextGrid"),
    ("a.srt", "1\n00:00:01,000 --> 00:00:02,000\nhi\n", "unknown transcript type"),
  ],
)
def test_malformed_transcripts_raise_data_errors_naming_file_and_line(tmp_path, name, content, expect):
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(DataError) as info:
    load_transcript(path)
  assert info.value.reason == "transcript"
  assert info.value.where == str(path)
  assert expect in str(info.value)


def test_stereo_wav_at_22050_hz_becomes_a_16_khz_episode(tmp_path):
  sf.write(tmp_path / "talk.wav", stereo(2.0, 22050), 22050, subtype="PCM_16")
  write_json(tmp_path / "talk.json")
  (ep,), skips = build.build_audio_episodes([tmp_path])
  assert not skips
  assert ep.id == "talk" and ep.sample_rate == SAMPLE_RATE
  assert ep.duration == pytest.approx(2.0, abs=1e-4)
  assert ep.user_audio.dtype == np.int16 and abs(len(ep.user_audio) - 32000) <= 1
  assert energy(ep.user_audio, 0.25, 0.75) > 1000 * energy(ep.model_audio, 0.25, 0.75) + 1
  assert energy(ep.model_audio, 1.25, 1.75) > 1000 * energy(ep.user_audio, 1.25, 1.75) + 1
  assert (ep.user_words, ep.model_words) == (USER, MODEL)
  assert (ep.typed_text, ep.bg_calls, ep.bg_results) == (EVENTS["typed_text"], EVENTS["bg_calls"], EVENTS["bg_results"])
  assert ep.meta["source_sample_rate"] == "22050"
  (swapped,), _ = build.build_audio_episodes([tmp_path / "talk.wav"], swap_channels=True)
  np.testing.assert_array_equal(swapped.user_audio, ep.model_audio)


def test_paired_files_are_padded_within_one_millisecond(tmp_path):
  audio = stereo()
  sf.write(tmp_path / "pair.user.flac", audio[:, 0], SAMPLE_RATE)
  sf.write(tmp_path / "pair.model.flac", audio[:-10, 1], SAMPLE_RATE)
  write_textgrid(tmp_path / "pair.TextGrid")
  (ep,), skips = build.build_audio_episodes([str(tmp_path / "*.flac")])
  assert not skips and ep.id == "pair"
  assert len(ep.user_audio) == len(ep.model_audio) == len(audio)
  assert energy(ep.model_audio, 1.25, 1.75) > 1000 * energy(ep.user_audio, 1.25, 1.75) + 1
  assert ep.user_words == USER and ep.bg_results == EVENTS["bg_results"]


def bad_inputs(root: pathlib.Path) -> pathlib.Path:
  """One good stereo file and one input for each skip reason."""
  root.mkdir()
  audio = stereo()
  sf.write(root / "good.wav", audio, SAMPLE_RATE)
  write_ctm(root / "good.ctm")
  nan = audio.copy()
  nan[100, 1] = np.nan
  sf.write(root / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
  write_json(root / "nan.json")
  sf.write(root / "order.wav", audio, SAMPLE_RATE)
  write_json(root / "order.json", user=USER[::-1])
  sf.write(root / "range.wav", audio, SAMPLE_RATE)
  write_json(root / "range.json", model=MODEL + [Word(2.1, 2.3, "late")])
  sf.write(root / "short.user.wav", audio[:, 0], SAMPLE_RATE)
  sf.write(root / "short.model.wav", audio[:-800, 1], SAMPLE_RATE)
  write_json(root / "short.json")
  return root


REASONS = {"nan": "non_finite", "order": "timestamps", "range": "timestamps", "short": "length"}


def test_bad_inputs_are_skipped_and_counted_or_raised(tmp_path):
  root = bad_inputs(tmp_path / "in")
  episodes, skips = build.build_audio_episodes([root])
  assert [ep.id for ep in episodes] == ["good"]
  assert skips == {"non_finite": 1, "timestamps": 2, "length": 1}
  for stem, reason in REASONS.items():
    with pytest.raises(DataError) as info:
      build.build_audio_episodes([str(root / f"{stem}*.wav")], on_error="raise")
    assert info.value.reason == reason, stem
  sf.write(root / "rate.user.wav", stereo()[:, 0], SAMPLE_RATE)
  sf.write(root / "rate.model.wav", stereo(2.0, 8000)[:, 1], 8000)
  (root / "lonely.wav").write_bytes((root / "good.wav").read_bytes())
  _, skips = build.build_audio_episodes([root / "rate.user.wav", root / "rate.model.wav", root / "lonely.wav"])
  assert skips == {"sample_rate": 1, "transcript": 1}


def test_cli_prints_the_summary_and_fails_when_nothing_is_written(tmp_path):
  root = bad_inputs(tmp_path / "in")
  run = lambda *args: run_build(*args, timeout=120)
  done = run("audio", str(root), f"--out={tmp_path / 'out'}")
  assert done.returncode == 0, done.stderr
  assert "episodes written: 1\nskipped: 4\n  length: 1\n  non_finite: 1\n  timestamps: 2\n" in done.stdout
  assert "nan.wav" in done.stderr  # the skip is logged with its file
  reader = EpisodeReader(tmp_path / "out")
  assert len(reader) == 1 and reader.read(0).id == "good"
  failed = run("audio", str(root / "nan.wav"), f"--out={tmp_path / 'none'}")
  assert failed.returncode != 0 and "episodes written: 0" in failed.stdout


def colour(k):
  return np.array([(37 * k) % 200 + 30, (91 * k) % 200 + 30, 230 - (5 * k) % 200], np.uint8)


def test_video_frames_are_resampled_resized_and_aligned_with_audio(tmp_path):
  fps, seconds = 25, 2.0
  count = round(fps * seconds)
  frames = np.stack([np.broadcast_to(colour(k), (120, 160, 3)) for k in range(count)])
  audio = stereo(seconds).T
  video.render_mp4(tmp_path / "clip.mp4", frames, fps, audio)
  write_json(tmp_path / "clip.json")
  video.render_mp4(tmp_path / "mute.mp4", frames[:10], fps)
  write_json(tmp_path / "mute.json")
  (tmp_path / "broken.mp4").write_bytes(b"not a video")
  episodes, skips = build.build_video_episodes([tmp_path], fps=5, width=80, height=40)
  assert skips == {"video": 2}  # mute.mp4 has no audio track, broken.mp4 is unreadable
  (ep,) = episodes
  assert ep.frames.shape == (10, 40, 80, 3)
  np.testing.assert_allclose(ep.frame_times, np.arange(10) * 0.2)
  for k in range(10):
    got = ep.frames[k].reshape(-1, 3).mean(axis=0)
    assert np.abs(got - colour(5 * k)).max() < 12, (k, got, colour(5 * k))
  assert ep.duration == pytest.approx(seconds, abs=1e-3)
  for a, b, user_speaks in ((0.25, 0.75, True), (1.25, 1.75, False)):
    loud, quiet = (ep.user_audio, ep.model_audio) if user_speaks else (ep.model_audio, ep.user_audio)
    assert energy(loud, a, b) > 100 * energy(quiet, a, b) + 1
  onset = np.argmax(np.abs(ep.user_audio.astype(np.int32)) > 3000) / SAMPLE_RATE
  assert onset == pytest.approx(0.2, abs=0.005)
  assert ep.user_words == USER
  mono_frames, _, mono = video.decode_mp4(tmp_path / "clip.mp4", fps=10, width=40, height=40)
  assert mono_frames.shape == (20, 40, 40, 3) and mono.shape == (2, 32000)
  with pytest.raises(ValueError, match="multiples of 40"):
    build.build_video_episodes([tmp_path], width=100, height=80)


def test_mono_video_audio_is_the_user_with_a_silent_model(tmp_path):
  video.render_mp4(tmp_path / "mono.mp4", np.zeros((5, 40, 40, 3), np.uint8), 5, stereo(1.0)[:, :1].T)
  write_json(tmp_path / "mono.json", user=USER, model=[], events={})
  (ep,), _ = build.build_video_episodes([tmp_path / "mono.mp4"], width=40, height=40)
  assert not ep.model_audio.any() and ep.user_audio.any()
  assert ep.frames.shape == (5, 40, 40, 3)


def test_patchify_is_row_major():
  frame = np.arange(80 * 120 * 3, dtype=np.uint32).reshape(80, 120, 3).astype(np.uint8)
  patches, rowcol = video.patchify(frame)
  assert patches.shape == (6, 40, 40, 3) and rowcol.dtype == np.int16
  assert rowcol.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
  for p, (r, c) in zip(patches, rowcol):
    np.testing.assert_array_equal(p, frame[40 * r : 40 * r + 40, 40 * c : 40 * c + 40])
  with pytest.raises(ValueError, match=r"\[100, 80, 3\]"):
    video.patchify(np.zeros((100, 80, 3), np.uint8))


def test_text_documents_become_text_only_episodes(tmp_path):
  (tmp_path / "notes.txt").write_text("First paragraph has\nfive words.\n\nSecond one.\n")
  chats = [
    {"turns": [{"speaker": "user", "text": "hi there"}, {"speaker": "model", "text": "Hello, how are you?"}]},
    {"turns": [{"speaker": "model", "text": "Hi."}, {"speaker": "user", "text": "what is 2 + 2?"}]},
  ]
  lines = [json.dumps(c) for c in chats] + ['{"turns": [{"speaker": "robot", "text": "x"}]}', '{"turns": []}']
  (tmp_path / "chats.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
  episodes, skips = build.build_text_episodes([tmp_path], words_per_second=5)
  assert skips == {"transcript": 1, "empty": 1}
  eps = {ep.id: ep for ep in episodes}
  assert sorted(eps) == ["chats-1", "chats-3", "notes"]
  for ep in episodes:
    assert not ep.has_audio and not ep.has_video
    starts = [w.start for w in ep.model_words]
    assert starts == sorted(starts) and all(w.end - w.start == pytest.approx(0.2) for w in ep.model_words)
    last = max([w.end for w in ep.model_words] + [e.time for e in ep.typed_text])
    assert ep.duration == pytest.approx(last + 0.2)
  notes = eps["notes"]
  assert [w.text for w in notes.model_words] == ["First", "paragraph", "has", "five", "words.\n\n", "Second", "one."]
  assert notes.model_words[5].start > notes.model_words[4].end  # a paragraph break is a pause
  first = eps["chats-1"]
  assert first.typed_text == [Event(first.typed_text[0].time, "hi there")]
  assert first.typed_text[0].time < first.model_words[0].start
  second = eps["chats-3"]
  assert second.typed_text[0].text == "what is 2 + 2?"
  assert second.typed_text[0].time >= second.model_words[-1].end


def test_json_lines_end_at_newlines_only(tmp_path):
  """U+2028 inside a JSON string, a byte-order mark and CRLF endings keep the lines and their
  numbers; a lone surrogate is a transcript skip, not an episode a tokenizer later chokes on."""
  docs = [{"turns": [{"speaker": "model", "text": "one\u2028two"}]}, {"turns": [{"speaker": "user", "text": "hi"}]}]
  text = "\ufeff" + "".join(json.dumps(d, ensure_ascii=False) + "\r\n" for d in docs)
  (tmp_path / "c.jsonl").write_bytes((text + '{"turns": [{"speaker": "model", "text": "\\ud800"}]}\n').encode())
  episodes, skips = build.build_text_episodes([tmp_path])
  assert [ep.id for ep in episodes] == ["c-1", "c-2"] and skips == {"transcript": 1}
  assert [w.text for w in episodes[0].model_words] == ["one", "two"]  # a line separator is white space in text


def test_committed_sample_corpus_reads_back_completely():
  sizes = sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file())
  assert sizes <= 4.5 * 2**20
  events = {"typed_text": 0, "bg_calls": 0, "bg_results": 0}
  kinds = {"conversations": (True, False), "video": (True, True), "text": (False, False)}
  for name, (has_audio, has_video) in kinds.items():
    reader = EpisodeReader(SAMPLE / name)
    assert len(reader) >= 3
    for i in range(len(reader)):
      ep = reader.read(i)
      assert (ep.has_audio, ep.has_video) == (has_audio, has_video), ep.id
      assert ep.model_words, ep.id
      for field in events:
        events[field] += len(getattr(ep, field))
      for call, result in zip(ep.bg_calls, ep.bg_results):
        assert call.time < result.time
      if has_audio:
        assert ep.user_words and ep.user_audio.any() and ep.model_audio.any()
      if has_video:
        assert ep.frames.shape[1:] == (80, 80, 3) and len(ep.frames) == pytest.approx(ep.duration * 5, abs=1)
  assert all(events.values()), events
