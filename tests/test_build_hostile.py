"""Hostile inputs to `python -m data_pipelines.build`: far timestamps, truncation, clipping, low rates, bad --out."""

import fractions
import pathlib

import av
import numpy as np
import soundfile as sf

from data_pipelines import build, video
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import EpisodeReader, Word
from tests.helpers import run_build
from tests.test_build import stereo, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
EARLY = {"user": [Word(0.1, 0.2, "hi")], "model": [Word(0.25, 0.4, "hello")]}  # fits in the first half second


def write_early_json(path):
  return write_json(path, user=EARLY["user"], model=EARLY["model"], events={})


def write_mp4(path, pts, audio, fps=5, faststart=False):
  """An MP4 with one 80x40 frame per entry of `pts` (in 1/fps units) and 16 kHz audio float32 [C, N]."""
  rate = fractions.Fraction(fps)
  layout = "stereo" if len(audio) == 2 else "mono"
  with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as out:
    v = out.add_stream(video._codec(("libx264", "h264", "mpeg4")), rate=rate)
    v.width, v.height, v.pix_fmt = 80, 40, "yuv420p"
    v.codec_context.thread_count = 1
    s = out.add_stream("aac", rate=SAMPLE_RATE, layout=layout)
    for i, p in enumerate(pts):
      image = np.broadcast_to(np.array([(40 + 10 * i) % 256, 90, 200], np.uint8), (40, 80, 3))
      frame = av.VideoFrame.from_ndarray(video.rgb_to_yuv420p(image), format="yuv420p")
      frame.pts, frame.time_base = p, 1 / rate
      out.mux(v.encode(frame))
    out.mux(v.encode(None))
    for start in range(0, audio.shape[1], 1024):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, start : start + 1024]), "fltp", layout)
      frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, fractions.Fraction(1, SAMPLE_RATE)
      out.mux(s.encode(frame))
    out.mux(s.encode(None))
  return path


def summary_of(stdout):
  return stdout[stdout.index("episodes written:") :]


def test_a_frame_far_past_the_audio_skips_that_video_with_bounded_memory(tmp_path):
  root = tmp_path / "in"
  root.mkdir()
  audio = stereo(3.0).T
  write_mp4(root / "good.mp4", list(range(15)), audio)
  write_json(root / "good.json")
  write_mp4(root / "late.mp4", list(range(14)) + [36_000 * 5], audio)  # the last frame is shown at 36,000 s
  write_json(root / "late.json")
  # At 320x240 the old sampler filled 180,000 frames (41 GB) up to the late frame; 3 GiB of address space is plenty.
  done = run_build("video", str(root), f"--out={tmp_path / 'out'}", memory_limit=3 * 2**30)
  assert done.returncode == 0, done.stderr
  assert "episodes written: 1\nskipped: 1\n  timestamps: 1\n" in done.stdout
  assert "late.mp4" in done.stderr and "36000" in done.stderr
  reader = EpisodeReader(tmp_path / "out")
  assert len(reader) == 1
  ep = reader.read(0)
  assert ep.id == "good" and ep.frames.shape == (15, 240, 320, 3)


def truncated_wav(path, frames=48_000, kept=23_994):
  """A 16-bit stereo WAV whose header promises `frames` frames, cut after `kept` frames and half a frame."""
  sf.write(path, stereo(frames / SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
  data = path.read_bytes()
  path.write_bytes(data[: 44 + 4 * kept + 2])
  assert sf.info(str(path)).frames == kept  # libsndfile quietly reports what is there, not what was promised
  return path


def test_a_truncated_wav_is_skipped_or_kept_and_counted_with_allow_truncated(tmp_path, capsys, caplog):
  root = tmp_path / "in"
  root.mkdir()
  sf.write(root / "good.wav", stereo(), SAMPLE_RATE)
  write_json(root / "good.json")
  truncated_wav(root / "cut.wav")
  write_early_json(root / "cut.json")
  assert build.main(["audio", str(root), f"--out={tmp_path / 'a'}"]) == 0
  assert "episodes written: 1\nskipped: 1\n  truncated: 1\nwarnings: 0\n" in capsys.readouterr().out
  assert "cut.wav" in caplog.text and "48000" in caplog.text and "23994" in caplog.text
  caplog.clear()
  assert build.main(["audio", str(root), f"--out={tmp_path / 'b'}", "--allow_truncated"]) == 0
  assert "episodes written: 2\nskipped: 0\nwarnings: 1\n  truncated_kept: 1\n" in capsys.readouterr().out
  assert "truncated_kept" in caplog.text and "cut.wav" in caplog.text
  reader = EpisodeReader(tmp_path / "b")
  eps = {reader.read(i).id: reader.read(i) for i in range(len(reader))}
  assert len(eps["cut"].user_audio) == 23_994  # what the file holds, nothing invented


def test_an_mp4_cut_in_half_with_its_moov_first_is_truncated(tmp_path, capsys, caplog):
  root = tmp_path / "in"
  root.mkdir()
  full = write_mp4(tmp_path / "full.mp4", list(range(15)), stereo(3.0).T, faststart=True)
  data = full.read_bytes()
  assert data.index(b"moov") < data.index(b"mdat")  # so the cut file still opens
  write_mp4(root / "good.mp4", list(range(15)), stereo(3.0).T)
  write_json(root / "good.json")
  (root / "cut.mp4").write_bytes(data[: len(data) // 2])
  write_early_json(root / "cut.json")
  size = ["--width=80", "--height=40"]
  assert build.main(["video", str(root), f"--out={tmp_path / 'a'}", *size]) == 0
  assert "episodes written: 1\nskipped: 1\n  truncated: 1\n" in capsys.readouterr().out
  assert "cut.mp4" in caplog.text and "mdat" in caplog.text
  assert build.main(["video", str(root), f"--out={tmp_path / 'b'}", *size, "--allow_truncated"]) == 0
  assert "episodes written: 2\nskipped: 0\nwarnings: 1\n  truncated_kept: 1\n" in capsys.readouterr().out
  reader = EpisodeReader(tmp_path / "b")
  cut = next(reader.read(i) for i in range(len(reader)) if reader.read(i).id == "cut")
  assert 0.5 < cut.duration < 2.5 and len(cut.frames) < 15


def test_float_audio_above_one_counts_a_clipping_warning(tmp_path, capsys, caplog):
  loud = stereo() * 3.4  # peaks at 1.7
  sf.write(tmp_path / "loud.wav", loud, SAMPLE_RATE, subtype="FLOAT")
  write_json(tmp_path / "loud.json")
  sf.write(tmp_path / "fine.wav", stereo(), SAMPLE_RATE, subtype="FLOAT")
  write_json(tmp_path / "fine.json")
  assert build.main(["audio", str(tmp_path), f"--out={tmp_path / 'out'}"]) == 0
  assert "episodes written: 2\nskipped: 0\nwarnings: 1\n  clipped: 1\n" in capsys.readouterr().out
  (record,) = [r for r in caplog.records if "clipped" in r.getMessage()]
  assert "loud.wav" in record.getMessage() and "1.7" in record.getMessage()


def test_audio_below_8_khz_counts_a_resampling_warning(tmp_path, capsys, caplog):
  sf.write(tmp_path / "slow.wav", np.full((3, 2), 0.25, np.float32), 1)  # three samples at 1 Hz
  write_early_json(tmp_path / "slow.json")
  assert build.main(["audio", str(tmp_path), f"--out={tmp_path / 'out'}"]) == 0
  assert "episodes written: 1\nskipped: 0\nwarnings: 1\n  resampled_below_8khz: 1\n" in capsys.readouterr().out
  (record,) = [r for r in caplog.records if "resampled_below_8khz" in r.getMessage()]
  assert "slow.wav" in record.getMessage() and "1 Hz" in record.getMessage()


def inputs_that_log(root):
  """A good recording and one that the build would skip with a logged reason."""
  root.mkdir()
  sf.write(root / "good.wav", stereo(), SAMPLE_RATE)
  write_json(root / "good.json")
  sf.write(root / "orphan.wav", stereo(), SAMPLE_RATE)  # no transcript
  return root


def test_out_that_cannot_be_a_directory_fails_in_one_line_before_processing(tmp_path):
  root = inputs_that_log(tmp_path / "in")
  taken = tmp_path / "taken"
  taken.write_text("not a directory\n")
  for out in (taken, taken / "below"):
    done = run_build("audio", str(root), f"--out={out}")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert "orphan" not in done.stderr and done.stdout == ""  # nothing was decoded or summarised
  assert taken.read_text() == "not a directory\n"


def test_a_write_failure_is_one_line_naming_the_path(tmp_path):
  root = inputs_that_log(tmp_path / "in")
  (root / "orphan.wav").unlink()
  # The disk fills up while the manifest is written (it is written under a temporary name, then renamed).
  full = tmp_path / "manifest"
  full.mkdir()
  (full / "manifest.json.tmp").symlink_to("/dev/full")
  # And a file may not grow past 20 kB while the shard, more than that, is written (Python ignores SIGXFSZ).
  for out, limit, why in ((full, None, "No space left on device"), (tmp_path / "shard", 20_000, "File too large")):
    done = run_build("audio", str(root), f"--out={out}", file_size_limit=limit)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(out) in lines[0] and why in lines[0], lines[0]
    assert not [p.name for p in out.iterdir() if p.name.endswith("tmp") and not p.is_symlink()]  # nothing half-written
