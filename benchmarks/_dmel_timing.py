"""Time of `data_pipelines.dmel.dmel_bins` against librosa's mel spectrogram on the same audio.

Run:  python benchmarks/_dmel_timing.py   (a few seconds)
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from data_pipelines import dmel
from data_pipelines.contract import SAMPLE_RATE


def _audio(seconds: float) -> np.ndarray:
  """Seeded 16 kHz float32 audio: vibrato harmonics plus noise, -40..-6 dBFS per second."""
  rng = np.random.default_rng(0)
  n = int(seconds * SAMPLE_RATE)
  t = np.arange(n) / SAMPLE_RATE
  phase = 2 * np.pi * np.cumsum(150 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SAMPLE_RATE
  x = sum(np.sin(h * phase) / h for h in range(1, 20)) + 0.1 * rng.standard_normal(n)
  level = 10 ** (rng.uniform(-40, -6, int(seconds) + 1) / 20)[(t // 1).astype(int)]
  return (x / np.abs(x).max() * level).astype(np.float32)


def time_dmel_vs_librosa(seconds: float = 60.0, repeats: int = 5) -> dict:
  """Median wall time of dmel_bins (causal) and of librosa.feature.melspectrogram with the same STFT
  and filterbank (power=1.0), each on the same `seconds` of audio, timed alternately in `repeats`
  rounds after one warm-up call each. Returns {"dmel_s", "librosa_s", "ratio": dmel_s / librosa_s}."""
  import librosa  # a test dependency, imported only here

  y = _audio(seconds)
  runs = {
    "dmel_s": lambda: dmel.dmel_bins(y),
    "librosa_s": lambda: librosa.feature.melspectrogram(
      y=y, sr=16000, n_fft=1024, hop_length=200, win_length=800, n_mels=80, fmin=80, fmax=7600, power=1.0
    ),
  }
  times = {name: [] for name in runs}
  for fn in runs.values():
    fn()
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  out = {name: statistics.median(ts) for name, ts in times.items()}
  out["ratio"] = out["dmel_s"] / out["librosa_s"]
  return out


if __name__ == "__main__":
  r = time_dmel_vs_librosa()
  print(f"dmel_bins {r['dmel_s'] * 1e3:.1f} ms, librosa {r['librosa_s'] * 1e3:.1f} ms, ratio {r['ratio']:.3f}")
