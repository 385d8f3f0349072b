"""Raw two-channel recordings for exercising dataset builds at any size, without a speech synthesizer.

`write_recordings(root, count)` writes `count` conversations as the audio builder reads them: stereo
WAV files (by default every third at 22,050 Hz, so that the build resamples it; every fourth as a
user/model pair of mono files), each with a JSON transcript beside it. Each speaker's words are tones at the
times the transcript gives, the two speakers taking turns with some overlap. With `bad=True` one
input of each kind a build must skip is added, named after the reason it is skipped for (`BAD`).
Output is a function of the arguments.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import soundfile as sf

from data_pipelines.contract import SAMPLE_RATE

# The bad inputs `write_recordings(bad=True)` adds, and the skip reason of each.
BAD = {
  "non_finite": "non_finite",
  "timestamps": "timestamps",
  "no_transcript": "transcript",
  "length": "length",
  "missing": "missing",
  "duplicate": "duplicate",
  "mono": "audio",
  "rates": "sample_rate",
  "truncated": "truncated",
}


def _words(rng: np.random.Generator, seconds: float) -> dict[str, list[dict]]:
  """Alternating turns of 3-8 words of 0.15-0.4 s each, starting 0.2-0.6 s after the previous turn
  began to end (so that turns overlap now and then)."""
  words: dict[str, list[dict]] = {"user": [], "model": []}
  t, speaker = 0.3, "user"
  while True:
    turn = []
    for _ in range(int(rng.integers(3, 9))):
      length = float(rng.uniform(0.15, 0.4))
      if t + length > seconds - 0.3:
        break
      turn.append({"word": f"w{int(rng.integers(1000))}", "start": round(t, 3), "end": round(t + length, 3)})
      t += length + float(rng.uniform(0.02, 0.1))
    if not turn:
      return words
    words[speaker] += turn
    t = turn[-1]["end"] + float(rng.uniform(-0.2, 0.6))
    t = max(t, turn[0]["start"] + 0.05)
    speaker = "model" if speaker == "user" else "user"


def _audio(words: dict[str, list[dict]], seconds: float, rate: int) -> np.ndarray:
  """[N, 2] float32: a tone per word (220 Hz for the user, 330 Hz for the model) and soft noise."""
  n = round(seconds * rate)
  t = np.arange(n) / rate
  audio = np.zeros((n, 2), np.float32)
  for channel, (speaker, freq) in enumerate((("user", 220.0), ("model", 330.0))):
    for w in words[speaker]:
      a, b = round(w["start"] * rate), round(w["end"] * rate)
      audio[a:b, channel] = 0.4 * np.sin(2 * np.pi * freq * t[a:b])
  noise = np.random.default_rng(n).normal(0, 0.003, audio.shape).astype(np.float32)
  return audio + noise


def write_recordings(
  root: str | pathlib.Path,
  count: int,
  *,
  seconds: float = 10.0,
  seed: int = 0,
  bad: bool = False,
  rates: tuple[int, ...] = (SAMPLE_RATE, SAMPLE_RATE, 22050),
  first: int = 0,
  suffix: str = ".wav",
) -> pathlib.Path:
  """Writes recordings `first` .. `first + count - 1` (and the `BAD` inputs with `bad`) under
  `root`, recording k at `rates[k % len(rates)]` Hz, as `suffix` files (.wav or .flac); returns `root`."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for k in range(first, first + count):
    rng = np.random.default_rng([seed, k])
    rate = rates[k % len(rates)]
    words = _words(rng, seconds)
    audio = _audio(words, seconds, rate)
    stem = root / f"rec{k:05d}"
    if k % 4 == 3:
      sf.write(stem.with_name(stem.name + ".user" + suffix), audio[:, 0], rate)
      sf.write(stem.with_name(stem.name + ".model" + suffix), audio[:, 1], rate)
    else:
      sf.write(stem.with_suffix(suffix), audio, rate)
    stem.with_suffix(".json").write_text(json.dumps(words))
  if bad:
    _write_bad(root, seconds, seed)
  return root


def _write_bad(root: pathlib.Path, seconds: float, seed: int) -> None:
  words = _words(np.random.default_rng([seed, 1 << 30]), seconds)
  audio = _audio(words, seconds, SAMPLE_RATE)
  transcript = json.dumps(words)
  nan = audio.copy()
  nan[100, 1] = np.nan
  sf.write(root / "non_finite.wav", nan, SAMPLE_RATE, subtype="FLOAT")
  (root / "non_finite.json").write_text(transcript)
  sf.write(root / "timestamps.wav", audio, SAMPLE_RATE)
  (root / "timestamps.json").write_text(json.dumps({"user": words["user"][::-1], "model": words["model"]}))
  sf.write(root / "no_transcript.wav", audio, SAMPLE_RATE)
  sf.write(root / "length.user.wav", audio[:, 0], SAMPLE_RATE)
  sf.write(root / "length.model.wav", audio[:-800, 1], SAMPLE_RATE)
  (root / "length.json").write_text(transcript)
  sf.write(root / "missing.user.wav", audio[:, 0], SAMPLE_RATE)
  (root / "missing.json").write_text(transcript)
  sf.write(root / "mono.wav", audio[:, 0], SAMPLE_RATE)  # one file must be stereo
  (root / "mono.json").write_text(transcript)
  sf.write(root / "rates.user.wav", audio[:, 0], SAMPLE_RATE)
  sf.write(root / "rates.model.wav", audio[::2, 1], SAMPLE_RATE // 2)
  (root / "rates.json").write_text(transcript)
  sf.write(root / "truncated.wav", audio, SAMPLE_RATE)
  whole = (root / "truncated.wav").read_bytes()
  (root / "truncated.wav").write_bytes(whole[: len(whole) // 2])  # its header promises twice what it holds
  (root / "truncated.json").write_text(transcript)
  for folder in ("duplicate_a", "duplicate_b"):  # two inputs with the episode id "duplicate"
    (root / folder).mkdir(exist_ok=True)
    sf.write(root / folder / "duplicate.wav", audio, SAMPLE_RATE)
    (root / folder / "duplicate.json").write_text(transcript)
