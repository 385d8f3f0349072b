"""The dMel featurizer matches a librosa reference, frames causally, crops and streams exactly."""

import librosa
import numpy as np
import pytest

from data_pipelines import dmel
from data_pipelines.contract import SAMPLE_RATE as SR


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
  """Seeded float32 test audio: chirps, vibrato harmonics, noise, silence at -60..-1 dBFS."""
  rng = np.random.default_rng(seed)
  n = int(seconds * SR)
  t = np.arange(n) / SR
  out = np.zeros(n)
  seg = SR // 2  # 0.5 s segments
  for i, s in enumerate(range(0, n, seg)):
    tt, m = t[s : s + seg] - t[s], min(seg, n - s)
    kind = i % 5
    if kind == 0:  # linear chirp 100 Hz → 7 kHz
      x = np.sin(2 * np.pi * (100 * tt + 6900 * tt**2))
    elif kind == 1:  # 12 harmonics of a 90-250 Hz f0 with vibrato, decaying spectrum
      f0 = rng.uniform(90, 250) * (1 + 0.03 * np.sin(2 * np.pi * 5 * tt))
      phase = 2 * np.pi * np.cumsum(f0) / SR
      x = sum(np.sin(h * phase) / h for h in range(1, 13))
    elif kind == 2:  # white noise with a 4 Hz amplitude envelope
      x = rng.standard_normal(m) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * tt))
    elif kind == 3:  # digital silence with a click
      x = np.zeros(m)
      x[m // 2] = 1.0
    else:  # brown noise
      x = np.cumsum(rng.standard_normal(m))
      x -= np.linspace(x[0], x[-1], m)
    peak = np.abs(x).max() or 1.0
    out[s : s + m] = x / peak * 10 ** (rng.uniform(-60, -1) / 20)
  return out.astype(np.float32)


@pytest.fixture(scope="module")
def audio():
  return _speechlike(6.0)


def _reference_log_mel(audio: np.ndarray, causal: bool) -> np.ndarray:
  """librosa STFT (float64) + librosa's filterbank + the spec's magnitude/floor/log10."""
  y = audio.astype(np.float64)
  if causal:  # window of frame i on [200i - 600, 200i + 200), centred in its 1024 frame
    y = np.pad(y, (712, 112))
  spec = librosa.stft(
    y, n_fft=1024, hop_length=200, win_length=800, window="hann", center=not causal, pad_mode="constant"
  )
  mag = np.sqrt(np.maximum(spec.real**2 + spec.imag**2, 1e-10))
  fb = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=80, fmin=80, fmax=7600).astype(np.float64)
  return np.log10(np.maximum(fb @ mag, 1e-10)).T[: len(audio) // 200]


def test_filterbank_matches_librosa():
  ref = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=80, fmin=80, fmax=7600)
  fb = dmel.mel_filterbank()
  assert fb.shape == (80, 513) and fb.dtype == np.float32
  np.testing.assert_allclose(fb, ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_librosa_reference(audio, causal):
  ref = _reference_log_mel(audio, causal)
  got = dmel.log_mel(audio, causal=causal)
  assert got.shape == ref.shape == (len(audio) // 200, 80) and got.dtype == np.float32
  assert np.ptp(dmel.quantize(ref)) >= 10  # the audio spans the dMel range
  # float32 FFT round-off is ~1e-8 of a frame's peak magnitude: 1e-3 within 5 decades (100 dB) of
  # the frame's loudest band, up to ~0.01 at the 1e-5 magnitude floor under a loud pure tone.
  near = ref > ref.max(axis=1, keepdims=True) - 5
  assert near.mean() > 0.7
  np.testing.assert_allclose(got[near], ref[near], atol=1e-3, rtol=0)
  np.testing.assert_allclose(got, ref, atol=0.02, rtol=0)
  diff = dmel.dmel_bins(audio, causal=causal).astype(int) - dmel.quantize(ref).astype(int)
  assert np.abs(diff).max() <= 1
  assert np.mean(np.abs(diff) == 1) < 0.001


def test_causal_frames_read_no_future_samples(audio):
  rng = np.random.default_rng(1)
  base = dmel.log_mel(audio)
  for k in (1, 3, 40, 117):
    future = audio.copy()
    future[200 * k :] = rng.uniform(-1, 1, len(audio) - 200 * k)
    np.testing.assert_array_equal(dmel.log_mel(future)[:k], base[:k])
    last = audio.copy()
    last[200 * k - 1] += 0.5  # the last sample of frame k-1's hop
    assert not np.array_equal(dmel.log_mel(last)[k - 1], base[k - 1])


def test_centered_frames_read_200_samples_ahead(audio):
  base = dmel.log_mel(audio, causal=False)
  for k in (1, 40):
    future = audio.copy()
    future[200 * k] += 0.5  # frame k-1 is centred on 200(k-1) and reads up to 200k + 199
    got = dmel.log_mel(future, causal=False)
    np.testing.assert_array_equal(got[: k - 1], base[: k - 1])
    assert not np.array_equal(got[k - 1], base[k - 1])


@pytest.mark.parametrize("causal", [True, False])
def test_crops_equal_whole_array_frames(audio, causal):
  whole = dmel.log_mel(audio, causal=causal)
  n = len(whole)
  for start, num in [(0, 1), (0, 16), (1, 1), (3, 16), (5, 37), (127, 2), (128, 200), (n - 16, 16), (n - 1, 1), (0, n)]:
    crop = dmel.log_mel(audio, causal=causal, start_frame=start, num_frames=num)
    np.testing.assert_array_equal(crop, whole[start : start + num], err_msg=f"crop {start}+{num}")
  np.testing.assert_array_equal(dmel.log_mel(audio, causal=causal, start_frame=n - 5), whole[-5:])
  # Frames past the end see zeros, like the frames of a zero-extended array.
  extended = dmel.log_mel(np.concatenate([audio, np.zeros(800, np.float32)]), causal=causal)
  past = dmel.log_mel(audio, causal=causal, start_frame=n - 2, num_frames=6)
  np.testing.assert_array_equal(past, extended[n - 2 : n + 4])


def test_frame_count_and_edge_cases(audio):
  assert dmel.log_mel(audio[:199]).shape == (0, 80)
  assert dmel.log_mel(audio[:4321]).shape == (21, 80)
  assert dmel.dmel_bins(audio[:4321], causal=False).dtype == np.uint8
  silence = dmel.log_mel(np.zeros(3200, np.float32))
  np.testing.assert_allclose(silence, np.log10(1e-5 * dmel.mel_filterbank().sum(1))[None].repeat(16, 0), rtol=1e-5)
  with pytest.raises(ValueError):
    dmel.log_mel(audio, start_frame=len(audio) // 200 + 1)
  with pytest.raises(ValueError):
    dmel.log_mel(audio[None])


def test_streaming_equals_offline_causal(audio):
  offline = dmel.log_mel(audio)
  for sizes in ([3200], [200, 600, 3200, 1000, 0, 16000]):
    stream, pushed, start = dmel.StreamingFeaturizer(), [], 0
    for i in range(10**6):
      if start >= len(audio):
        break
      chunk = audio[start : start + sizes[i % len(sizes)]]  # multiples of 200: len(audio) is one
      pushed.append(stream.push(chunk))
      assert pushed[-1].shape == (len(chunk) // 200, 80)
      start += len(chunk)
    streamed = np.concatenate(pushed)
    assert stream.num_frames == len(streamed) == len(offline)
    np.testing.assert_array_equal(dmel.quantize(streamed), dmel.quantize(offline))
    np.testing.assert_array_equal(streamed, offline)
  with pytest.raises(ValueError):
    dmel.StreamingFeaturizer().push(np.zeros(300, np.float32))


def test_int16_equals_float_over_32768(audio):
  pcm = np.round(audio * 32767).astype(np.int16)
  as_float = pcm.astype(np.float32) / 32768
  for causal in (True, False):
    np.testing.assert_array_equal(dmel.log_mel(pcm, causal=causal), dmel.log_mel(as_float, causal=causal))
  np.testing.assert_array_equal(dmel.StreamingFeaturizer().push(pcm[:3200]), dmel.log_mel(as_float[:3200]))
