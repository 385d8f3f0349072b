"""Is the episode pipeline fast enough never to starve training?

Run:  python benchmarks/data.py              (about 3-4 minutes on 2 shared cores)

In one run it measures
  (1) pipeline throughput on one core (one thread, one process, `EpisodeSource.row_and_stats`),
      in seconds of conversation packed per second, on generated episodes of 60 s: audio only
      (the sample_cpu preset's rows) and with 320x240 video at 5 fps (48 patches per micro-turn, rows of
      2048 positions). The header cache holds 2 episodes of the 16, so most windows read their
      episode's header record and then the 5 s media chunks they cover from the ArrayRecord
      shard, as with a corpus larger than memory;
  (2) for the `sample_cpu` and `cpu_bench` presets on the committed sample corpus: rows per second the
      configured Grain pipeline delivers (`make_dataset`, its threads, this machine's cores)
      against rows per second their training steps consume (`python -m tmlx.main` in a child
      process, median logged step time after the first log point, same machine, just before);
  (3) dMel featurization time ÷ librosa's melspectrogram time on the same 60 s of audio
      (medians of alternating repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from data_pipelines import episode as ep_lib  # noqa: E402
from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE  # noqa: E402
from experiments.sample_cpu import SAMPLE_MIXTURE  # noqa: E402

AUDIO_TARGET = 100.0
VIDEO_TARGET = 20.0
HEADROOM_TARGET = 5.0
DMEL_TARGET = 1.0


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--episodes", type=int, default=16, help="generated episodes per dataset (default: %(default)s)")
  p.add_argument("--seconds", type=float, default=60.0, help="length of each generated episode (default: %(default)s)")
  p.add_argument("--rows", type=int, default=48, help="rows timed per throughput measurement (default: %(default)s)")
  p.add_argument("--train-steps", type=int, default=30, help="steps of each training run (default: %(default)s)")
  return p.parse_args(argv)


def load_config(name: str, arg: str | None = None):
  import importlib

  return importlib.import_module(f"experiments.{name}").get_config(arg)


def generated_dataset(directory: str, n: int, seconds: float, video: bool) -> None:
  """Episodes with noisy speech-band audio on both channels, words every 0.4 s, optional video."""
  rng = np.random.default_rng(0)
  sr = SAMPLE_RATE
  samples = int(seconds * sr)
  t = np.arange(samples) / sr

  def channel(f0):
    x = 0.2 * np.sin(2 * np.pi * f0 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + rng.normal(0, 0.02, samples)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)

  episodes = []
  for i in range(n):
    frames = times = None
    if video:
      times = np.arange(0, seconds - 1e-9, 0.2)
      frames = rng.integers(0, 256, size=(len(times), 240, 320, 3), dtype=np.uint8)
    words = [ep_lib.Word(s, s + 0.3, f"word{k % 50}") for k, s in enumerate(np.arange(0.3, seconds - 0.5, 0.4))]
    episodes.append(
      ep_lib.Episode(
        id=f"e{i}",
        duration=samples / sr,
        user_audio=channel(180 + 20 * i),
        model_audio=channel(220 + 15 * i),
        frames=frames,
        frame_times=times,
        model_words=words,
      )
    )
  ep_lib.write_dataset(episodes, directory, episodes_per_shard=4)


def source_throughput(config, rows: int) -> float:
  """Seconds of conversation packed per second of one thread."""
  from data_pipelines.pipeline import make_source

  source = make_source(config)
  source.row_and_stats(0, 0)  # warm up imports and the filterbank
  t0 = time.perf_counter()
  micro_turns = 0
  for r in range(rows):
    row, _ = source.row_and_stats(1, r)
    used = row["kind"] != 0
    micro_turns += len(set(zip(row["segment_ids"][used].tolist(), row["micro_turn"][used].tolist())))
  return micro_turns * MICRO_TURN_SECONDS / (time.perf_counter() - t0)


def pipeline_rows_per_s(config, steps: int) -> float:
  """Rows per second `make_dataset` delivers with the config's threads (first batch not timed)."""
  from data_pipelines.pipeline import make_dataset

  it = iter(make_dataset(config, start_step=0, num_steps=steps + 1, process_index=0, process_count=1))
  next(it)
  t0 = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * config.data.global_batch_size / (time.perf_counter() - t0)


def training_rows_per_s(preset: str, steps: int, workdir: str) -> float:
  """Rows per second the preset's train step consumes, from a `tmlx.main` run in a child process."""
  cmd = [
    sys.executable,
    "-m",
    "tmlx.main",
    f"--config={os.path.join(ROOT, 'experiments', preset + '.py')}",
    f"--workdir={workdir}",
    f"--config.train.num_steps={steps}",
    "--config.checkpoint.every=0",
    "--config.logging.every=2",
    "--config.logging.tensorboard=False",
    "--config.data.source=episodes",
    f"--config.data.mixture={SAMPLE_MIXTURE}",
    "--config.data.max_patches=64",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    times = [json.loads(line)["step_time_s"] for line in f][1:]
  config = load_config(preset)
  return config.data.global_batch_size / statistics.median(times)


def main(argv=None) -> None:
  args = parse_args(argv)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    print(f"generating {args.episodes} episodes of {args.seconds:.0f} s, audio only and with 320x240 video ...")
    generated_dataset(os.path.join(tmp, "audio"), args.episodes, args.seconds, video=False)
    generated_dataset(os.path.join(tmp, "video"), args.episodes, args.seconds, video=True)

    # (2) training consumption first, so the throughput runs below do not share the cores with it.
    headroom = {}
    for preset in ("sample_cpu", "cpu_bench"):
      steps = args.train_steps if preset == "sample_cpu" else 6
      train_rps = training_rows_per_s(preset, steps, os.path.join(tmp, preset))
      c = load_config(preset)
      c.data.source = "episodes"
      c.data.mixture = SAMPLE_MIXTURE
      c.data.max_patches = 64
      pipe_rps = pipeline_rows_per_s(c, steps=8)
      headroom[preset] = pipe_rps / train_rps
      print(f"{preset:10s}: pipeline {pipe_rps:8.1f} rows/s, training consumes {train_rps:6.2f} rows/s")

    # (1) one-core throughput.
    c = load_config("sample_cpu")
    c.data.source = "episodes"
    c.data.episode_cache = 2
    c.data.mixture = os.path.join(tmp, "audio")
    audio_x = source_throughput(c, args.rows)
    c.data.mixture = os.path.join(tmp, "video")
    c.data.seq_len = 2048
    c.data.frame_height, c.data.frame_width = 240, 320
    c.data.max_patches = 48 * 40
    video_x = source_throughput(c, max(args.rows // 4, 4))
    print(f"one core: {audio_x:.0f} s of conversation per s audio only, {video_x:.0f} with 5 fps 320x240 video")

  # (3) dMel against librosa.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from _dmel_timing import time_dmel_vs_librosa

  d = time_dmel_vs_librosa(seconds=60.0)
  print(f"dMel of 60 s: {d['dmel_s'] * 1e3:.1f} ms, librosa melspectrogram {d['librosa_s'] * 1e3:.1f} ms")

  results = {
    "pipeline_audio_realtime_x_per_core": (audio_x, f"target>={AUDIO_TARGET:g}"),
    "pipeline_video_realtime_x_per_core": (video_x, f"target>={VIDEO_TARGET:g}"),
    "pipeline_vs_train_rows_tiny": (headroom["sample_cpu"], f"target>={HEADROOM_TARGET:g}"),
    "pipeline_vs_train_rows_cpu_bench": (headroom["cpu_bench"], f"target>={HEADROOM_TARGET:g}"),
    "dmel_vs_librosa_time": (d["ratio"], f"target<={DMEL_TARGET:g}"),
  }
  for name, (value, target) in results.items():
    print(f"{name} {value:.3g} {target}")


if __name__ == "__main__":
  main()
