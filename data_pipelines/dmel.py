"""Mel value conventions shared by the dMel input and the flow-matching output (MODEL_SPEC.md §2),
and the dMel audio featurizer. The constants are `data_pipelines.contract`'s.

Log-mel values are log10 mel energies. dMel discretizes them into 16 bins with centres
-7 + 0.6·i; the flow head predicts them normalized to [-1, 1] as (clip(v, -7, 2) + 2.5) / 4.5.

Featurizer: 16 kHz mono; STFT with n_fft 1024, a periodic Hann window of 800 samples and hop 200
(80 frames/s, 16 frames per 200 ms micro-turn); magnitude sqrt(max(re² + im², 1e-10)); 80 Slaney
mel filters (Slaney area normalization, 80-7600 Hz, as librosa.filters.mel); log10 of the mel
energies floored at 1e-10. Frame i belongs to samples [200i, 200i + 200). Its 800-sample window
covers [200i - 600, 200i + 200) when causal (it ends with its hop and reads nothing later), or
[200i - 400, 200i + 400) when centered (librosa's center=True framing). Samples outside the array
are zeros. An array of N samples has N // 200 frames in both modes.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from data_pipelines.contract import (
  BIN_WIDTH,
  FRAMES_PER_MICRO_TURN,
  LOG_MEL_MAX,
  LOG_MEL_MIN,
  MEL_NORM_OFFSET,
  MEL_NORM_SCALE,
  NUM_DMEL_BINS,
  NUM_MELS,
  SAMPLE_RATE,
  SAMPLES_PER_MICRO_TURN,
)

N_FFT = 1024
WIN_LENGTH = 800
HOP_LENGTH = SAMPLES_PER_MICRO_TURN // FRAMES_PER_MICRO_TURN  # 200 samples: 80 frames/s
FMIN = 80.0
FMAX = 7600.0
CAUSAL_CONTEXT = WIN_LENGTH - HOP_LENGTH  # 600 samples before a causal frame's hop
_FFT_BINS = N_FFT // 2 + 1  # 513
_FLOOR = 1e-10
_MAG_FLOOR = np.float32(1e-5 / N_FFT)
_BLOCK = 128  # frames per mel matmul; see _log_mel_frames
_GROUPS = 4  # filterbank bands, of 20 filters each


def quantize(log_mel: np.ndarray) -> np.ndarray:
  """Log10 mel [...] float → dMel bins [...] uint8 (nearest bin centre)."""
  v = np.clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX)
  bins = np.rint((v - LOG_MEL_MIN) / BIN_WIDTH)
  return np.clip(bins, 0, NUM_DMEL_BINS - 1).astype(np.uint8)


def bin_centres() -> np.ndarray:
  return LOG_MEL_MIN + BIN_WIDTH * np.arange(NUM_DMEL_BINS, dtype=np.float32)


def normalize(log_mel: np.ndarray) -> np.ndarray:
  """Log10 mel → flow-head target in [-1, 1]."""
  return (np.clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX) + MEL_NORM_OFFSET) / MEL_NORM_SCALE


def denormalize(x: np.ndarray) -> np.ndarray:
  """Flow-head output in [-1, 1] → log10 mel."""
  return np.asarray(x, np.float32) * MEL_NORM_SCALE - MEL_NORM_OFFSET


_MEL_LINEAR_HZ = 200.0 / 3  # Slaney mel: linear (Hz per mel) below 1 kHz, logarithmic above
_MEL_LOG_START = 1000.0 / _MEL_LINEAR_HZ
_MEL_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
  if hz < 1000.0:
    return hz / _MEL_LINEAR_HZ
  return _MEL_LOG_START + np.log(hz / 1000.0) / _MEL_LOG_STEP


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  log_hz = 1000.0 * np.exp(_MEL_LOG_STEP * (mel - _MEL_LOG_START))
  return np.where(mel >= _MEL_LOG_START, log_hz, _MEL_LINEAR_HZ * mel)


@functools.cache
def mel_filterbank() -> np.ndarray:
  """[80, 513] float32 Slaney-normalized triangular filters; equals librosa.filters.mel(sr=16000,
  n_fft=1024, n_mels=80, fmin=80, fmax=7600). Read-only."""
  fft_hz = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
  mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), NUM_MELS + 2))
  ramps = mel_hz[:, None] - fft_hz[None, :]
  gaps = np.diff(mel_hz)
  rising = -ramps[:-2] / gaps[:-1, None]
  falling = ramps[2:] / gaps[1:, None]
  weights = np.maximum(0, np.minimum(rising, falling)).astype(np.float32)
  weights = (weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]).astype(np.float32)
  weights.flags.writeable = False
  return weights


@functools.cache
def _constants() -> tuple[np.ndarray, slice, list[tuple[slice, slice, np.ndarray]]]:
  """(window [800], the rfft bins any filter uses, the filterbank in _GROUPS bands).

  A band is (its filters, its bins relative to the used ones, 1024 x the transposed weights on
  them): the filters are narrow, so this is a quarter of the dense [513, 80] matmul.
  """
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)).astype(np.float32)
  fb = mel_filterbank()
  used = [np.flatnonzero(row) for row in fb]
  first = int(used[0][0])
  bands = []
  for lo, hi in itertools.pairwise(range(0, NUM_MELS + 1, NUM_MELS // _GROUPS)):
    bins = slice(int(used[lo][0]), int(used[hi - 1][-1]) + 1)
    weights = np.ascontiguousarray(fb[lo:hi, bins].T) * np.float32(N_FFT)
    bands.append((slice(lo, hi), slice(bins.start - first, bins.stop - first), weights))
  return window, slice(first, int(used[-1][-1]) + 1), bands


def _log_mel_frames(x: np.ndarray, first: int, n: int) -> np.ndarray:
  """Log-mel [n, 80] of the frames whose windows are x[200j : 200j + 800], j < n.

  `first` is the absolute index of frame 0. The FFT runs with norm="forward" (numpy's float32 path;
  it is 2x slower with the default norm) and the 1/1024 is undone exactly in the filterbank. The
  mel matmuls run on fixed [_BLOCK, bins] blocks, frame i at row i % _BLOCK, and log10 on the fixed
  [_BLOCK, 80] result: BLAS picks its kernel by shape, so this keeps every frame's value bitwise
  independent of which crop or stream push computed it.
  """
  window, used, bands = _constants()
  out = np.empty((n, NUM_MELS), np.float32)
  if n == 0:
    return out
  frames = sliding_window_view(x[: HOP_LENGTH * (n - 1) + WIN_LENGTH], WIN_LENGTH)[::HOP_LENGTH]
  buf = np.zeros((_BLOCK, N_FFT), np.float32)  # windowed frames, zero-padded to n_fft
  spec = np.empty((_BLOCK, _FFT_BINS), np.complex64)
  mag = np.zeros((_BLOCK, used.stop - used.start), np.float32)
  mel = np.empty((_BLOCK, NUM_MELS), np.float32)
  j = 0
  while j < n:
    p = (first + j) % _BLOCK
    m = min(_BLOCK - p, n - j)
    rows = slice(p, p + m)
    np.multiply(frames[j : j + m], window, out=buf[rows, :WIN_LENGTH])
    np.fft.rfft(buf[rows], norm="forward", out=spec[rows])
    # |X| / 1024 (a hypot) floored at 1e-5 / 1024: sqrt(max(re² + im², 1e-10)) of the unnormalized
    # FFT up to float32 rounding (the 1024 is exact).
    np.maximum(np.abs(spec[rows, used], out=mag[rows]), _MAG_FLOOR, out=mag[rows])
    for filters, bins, weights in bands:
      np.matmul(mag[:, bins], weights, out=mel[:, filters])
    np.log10(np.maximum(mel, _FLOOR, out=mel), out=mel)
    out[j : j + m] = mel[rows]
    j += m
  return out


def _check_audio(audio: np.ndarray) -> np.ndarray:
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"audio must be 1-D mono, got shape {audio.shape}")
  if audio.dtype != np.int16 and not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(f"audio must be int16 or float, got {audio.dtype}")
  return audio


def _to_float32(audio: np.ndarray) -> np.ndarray:
  """int16 → float32 / 32768; float → float32."""
  if audio.dtype == np.int16:
    return audio.astype(np.float32) * np.float32(1 / 32768)
  return audio.astype(np.float32, copy=False)


def log_mel(
  audio: np.ndarray,
  *,
  causal: bool = True,
  start_frame: int = 0,
  num_frames: int | None = None,
  origin_frame: int = 0,
) -> np.ndarray:
  """Log10 mel [num_frames, 80] float32 of frames [start_frame, start_frame + num_frames) of 16 kHz
  mono `audio` (int16, or float in [-1, 1]); num_frames defaults to the rest of len(audio) // 200.

  Reads only the samples those frames need, so a crop of a long episode is cheap; samples outside
  the array, also for frames past its end, are zeros. When `audio` is itself a piece of a longer
  recording that starts at frame `origin_frame` of it, pass that: each frame's value is then the
  same bitwise as from the whole recording (BLAS kernels round a row by its place in a block).
  """
  audio = _check_audio(audio)
  if num_frames is None:
    num_frames = len(audio) // HOP_LENGTH - start_frame
  if start_frame < 0 or num_frames < 0:
    raise ValueError(f"need start_frame >= 0 and num_frames >= 0, got {start_frame}, {num_frames}")
  lo = HOP_LENGTH * start_frame - (CAUSAL_CONTEXT if causal else WIN_LENGTH // 2)  # frame 0's window
  hi = lo + HOP_LENGTH * max(num_frames - 1, 0) + WIN_LENGTH
  x = np.zeros(hi - lo, np.float32)
  a, b = max(lo, 0), min(hi, len(audio))
  if a < b:
    x[a - lo : b - lo] = _to_float32(audio[a:b])
  return _log_mel_frames(x, origin_frame + start_frame, num_frames)


def dmel_bins(
  audio: np.ndarray,
  *,
  causal: bool = True,
  start_frame: int = 0,
  num_frames: int | None = None,
  origin_frame: int = 0,
) -> np.ndarray:
  """dMel bins [num_frames, 80] uint8: quantize(log_mel(audio, ...)), same arguments."""
  return quantize(
    log_mel(audio, causal=causal, start_frame=start_frame, num_frames=num_frames, origin_frame=origin_frame)
  )


class StreamingFeaturizer:
  """Causal log-mel of a live 16 kHz stream, pushed in multiples of 200 samples.

  Its frames equal `log_mel(all_samples_pushed)` (causal) bitwise.
  """

  def __init__(self):
    self._context = np.zeros(CAUSAL_CONTEXT, np.float32)  # the last 600 samples (zeros at start)
    self.num_frames = 0  # frames returned so far

  def push(self, samples: np.ndarray) -> np.ndarray:
    """Samples [200k] int16 or float → log-mel [k, 80] float32 of their k frames."""
    samples = _check_audio(samples)
    if len(samples) % HOP_LENGTH:
      raise ValueError(f"push a multiple of {HOP_LENGTH} samples, got {len(samples)}")
    x = np.concatenate([self._context, _to_float32(samples)])
    n = len(samples) // HOP_LENGTH
    out = _log_mel_frames(x, self.num_frames, n)
    self._context = x[len(x) - CAUSAL_CONTEXT :].copy()
    self.num_frames += n
    return out
