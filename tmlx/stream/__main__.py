"""Runs a recorded conversation through a streaming session, micro-turn by micro-turn.

  python -m tmlx.stream --checkpoint WORKDIR --input conversation.wav [--video clip.mp4] --out DIR

The user's audio (channel 0 of the WAV/FLAC, resampled to 16 kHz) arrives in 200 ms pieces, with
the video frame of each window if a video is given. Simulated real time: piece t arrives at
t x 200 ms and its answer is ready when the session has finished it and every earlier piece, so a
slow micro-turn delays the ones after it (counted as late when its answer comes after its 200 ms
window ends). Writes into --out:
  mel.npy         the model's speech as normalized log-mel [frames, 80] (12.5 ms frames)
  speech.wav      that mel through a Griffin-Lim vocoder (a listening baseline, not a neural vocoder)
  timeline.json   per micro-turn: what was heard (typed/background text) and said, latency, lateness
  timeline.png    the user's dMel input, the model's mel, and the words said, on one time axis
and prints the latency percentiles and the real-time factor (compute time / audio time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from tmlx import cli, paths
from tmlx.stream.config import SAMPLING_FIELDS, define_sampling_flags, override


def read_user_audio(path: str) -> np.ndarray:
  """Channel 0 of an audio file as float32 at 16 kHz."""
  import soundfile as sf
  import soxr

  from data_pipelines.contract import SAMPLE_RATE

  try:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
  except (RuntimeError, OSError) as e:
    raise SystemExit(f"--input {path}: cannot read audio: {e}") from None
  user = audio[:, 0]
  if not np.isfinite(user).all():
    raise SystemExit(f"--input {path}: the audio has NaN or Inf samples")
  return np.asarray(soxr.resample(user, rate, SAMPLE_RATE), np.float32) if rate != SAMPLE_RATE else user


def griffin_lim(mel: np.ndarray, iters: int) -> np.ndarray:
  """Normalized log-mel [frames, 80] → a 16 kHz waveform (Griffin-Lim over the dMel STFT layout)."""
  import librosa

  from data_pipelines import dmel
  from data_pipelines.contract import SAMPLE_RATE

  amplitude = 10.0 ** dmel.denormalize(mel).T  # log10 mel magnitudes → [80, frames]
  return librosa.feature.inverse.mel_to_audio(
    amplitude,
    sr=SAMPLE_RATE,
    n_fft=dmel.N_FFT,
    hop_length=dmel.HOP_LENGTH,
    win_length=dmel.WIN_LENGTH,
    power=1.0,
    n_iter=iters,
    fmin=dmel.FMIN,
    fmax=dmel.FMAX,
    center=False,
  ).astype(np.float32)


def plot_timeline(path: str, heard: np.ndarray, said: np.ndarray, turns: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from data_pipelines.contract import MICRO_TURN_SECONDS as T

  seconds = len(turns) * T
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, seconds * 1.5), 6), sharex=True)
  top.imshow(heard.T, origin="lower", aspect="auto", extent=(0, seconds, 0, 80), cmap="magma")
  top.set_title("heard: user dMel bins")
  bottom.imshow(said.T, origin="lower", aspect="auto", extent=(0, seconds, 0, 80), cmap="viridis", vmin=-1, vmax=1)
  bottom.set_title("said: model mel (played in the next window) and text")
  for turn in turns:
    if turn["said"]:
      bottom.text(turn["t"] * T + T, 70, turn["said"], fontsize=7, color="white", rotation=90, va="top")
    if turn["heard"]:
      top.text(turn["t"] * T, 70, turn["heard"], fontsize=7, color="cyan", rotation=90, va="top")
  bottom.set_xlabel("seconds")
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def stream_recording(
  checkpoint: str,
  recording: str,
  out: str,
  *,
  step: int | None = None,
  video: str | None = None,
  max_seconds: float | None = None,
  seed: int = 0,
  griffin_lim_iters: int = 32,
  **stream: float | int | None,
) -> dict:
  """Runs `recording` (an audio file; channel 0 is the user) and `video` through a session of
  `checkpoint` as the module docstring says, writes the four files into `out` and prints what was
  said and the latencies; returns the summary (checkpoint step, micro-turns, latency percentiles,
  late micro-turns, real-time factor). `stream`: config.stream fields to override
  (tmlx.stream.config.SAMPLING_FIELDS; None keeps the checkpoint's). A missing or unreadable input raises
  SystemExit naming its flag."""
  for flag, path in (("--input", recording), ("--video", video)):  # before loading anything heavy
    if path is not None and not os.path.isfile(path):
      raise SystemExit(f"{flag} {path}: no such file")
  if paths.exists(out) and not paths.is_dir(out):
    raise SystemExit(f"--out {out}: exists and is not a directory")
  import jax
  import soundfile as sf

  from data_pipelines.contract import MICRO_TURN_SECONDS as T
  from data_pipelines.contract import SAMPLE_RATE, SAMPLES_PER_MICRO_TURN
  from tmlx.inference import load_model
  from tmlx.stream import Session, StreamConfig

  try:
    model, config, step = load_model(checkpoint, step=step, devices=jax.devices()[:1])
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint: {e}") from None
  paths.makedirs(out)
  override(config, stream, SAMPLING_FIELDS, "stream_recording")
  audio = read_user_audio(recording)
  if max_seconds is not None:
    audio = audio[: int(max_seconds * SAMPLE_RATE)]
  turns_total = len(audio) // SAMPLES_PER_MICRO_TURN
  frames = None
  if video:
    from data_pipelines.episode import DataError
    from data_pipelines.video import decode_mp4

    try:  # one frame per 200 ms window, at the model's frame size
      frames, _, _ = decode_mp4(video, fps=1 / T, width=config.data.frame_width, height=config.data.frame_height)
    except DataError as e:
      raise SystemExit(f"--video {video}: {e}") from None
  session = Session(model, StreamConfig.from_config(config), seed=seed)
  # Compile outside the timed loop: one micro-turn of silence (with a frame if there is video).
  session.step(np.zeros(SAMPLES_PER_MICRO_TURN, np.float32), frame=None if frames is None else frames[0])
  session.reset(seed)
  print(f"checkpoint step {step}: {turns_total} micro-turns ({turns_total * T:.1f} s) of {recording}", flush=True)

  mels, heard_bins, turns, latencies = [], [], [], []
  ready = 0.0  # simulated clock: when the previous answer was ready (seconds from the start)
  busy = 0.0
  for t in range(turns_total):
    piece = audio[t * SAMPLES_PER_MICRO_TURN : (t + 1) * SAMPLES_PER_MICRO_TURN]
    frame = frames[t] if frames is not None and t < len(frames) else None
    result = session.step(piece, frame=frame)
    latency = result.latency_s
    busy += latency
    arrival = (t + 1) * T  # the window's audio is complete at its end
    ready = max(arrival, ready) + latency
    late = ready > arrival + T
    latencies.append(latency)
    mels.append(result.mel)
    heard_bins.append(result.heard_dmel)
    turns.append(
      {
        "t": t,
        "heard": session.transcript[-1][1],
        "said": result.text,
        "bg_calls": result.bg_calls,
        "latency_ms": round(latency * 1000, 3),
        "answer_ready_s": round(ready, 4),
        "late": bool(late),
      }
    )
  if not turns:
    raise SystemExit(f"--input {recording}: shorter than one 200 ms micro-turn")
  mel = np.concatenate(mels)
  with paths.open(paths.join(out, "mel.npy"), "wb") as f:
    np.save(f, mel)
  with paths.open(paths.join(out, "speech.wav"), "wb") as f:
    sf.write(f, griffin_lim(mel, griffin_lim_iters), SAMPLE_RATE, format="WAV")
  lat = np.array(latencies) * 1000
  summary = {
    "checkpoint_step": step,
    "micro_turns": len(turns),
    "latency_ms": {q: round(float(np.percentile(lat, p)), 3) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
    "late_micro_turns": sum(turn["late"] for turn in turns),
    "real_time_factor": round(busy / (len(turns) * T), 4),
  }
  with paths.open(paths.join(out, "timeline.json"), "w") as f:
    json.dump({"summary": summary, "micro_turns": turns}, f, indent=1)
  plot_timeline(paths.join(out, "timeline.png"), np.concatenate(heard_bins), mel, turns)
  said = " | ".join(f"{turn['t']}: {turn['said']!r}" for turn in turns if turn["said"])
  print(f"said: {said[:2000] or '(nothing)'}")
  lq = summary["latency_ms"]
  print(
    f"micro-turn latency p50 {lq['p50']:.1f} ms, p90 {lq['p90']:.1f} ms, p99 {lq['p99']:.1f} ms "
    f"(budget 200 ms); late micro-turns {summary['late_micro_turns']} of {len(turns)}; "
    f"real-time factor {summary['real_time_factor']:.3f}"
  )
  print(f"wrote {out}/mel.npy, speech.wav, timeline.json, timeline.png")
  return summary


# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m tmlx.stream"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("checkpoint", None, "A workdir or checkpoint directory.", required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string(
    "input", None, "The conversation's audio (WAV/FLAC; channel 0 is the user).", required=True, flag_values=fv
  )
  flags.DEFINE_string("video", None, "An MP4 of the user, one frame per micro-turn.", flag_values=fv)
  flags.DEFINE_string(
    "out", None, "Directory for mel.npy, speech.wav, timeline.json/png.", required=True, flag_values=fv
  )
  flags.DEFINE_float("max_seconds", None, "Stop after this much input.", flag_values=fv)
  define_sampling_flags(fv)
  flags.DEFINE_integer("seed", 0, "The session's sampling seed.", flag_values=fv)
  flags.DEFINE_integer("griffin_lim_iters", 32, "Griffin-Lim iterations of speech.wav.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """`stream_recording` with the parsed command line's flags; a bad input ends it in one line."""
  if args:
    cli.fail(PROG, f"takes no positional arguments; got {args}")
  names = ("step", "video", "max_seconds", "seed", "griffin_lim_iters", *SAMPLING_FIELDS)
  with cli.one_line_exits(PROG):
    stream_recording(fv.checkpoint, fv.input, fv.out, **{name: fv[name].value for name in names})
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.stream ARGS` in this process on `argv` (ARGS; default sys.argv[1:]);
  returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run)
