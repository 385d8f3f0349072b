"""Audio episodes: stereo or paired WAV/FLAC recordings, each with a transcript beside it.

A stereo `<stem>.wav` or `<stem>.flac` holds the user in channel 0 and the model in 1 (`swap_channels`
swaps them); a mono pair `<stem>.user.wav` + `<stem>.model.wav` (or .flac) needs equal sample rates
and lengths equal within PAIR_TOLERANCE_SECONDS (the shorter is padded with silence). Audio at
another rate is resampled to 16 kHz. The audio helpers here serve the video builder too.
"""

from __future__ import annotations

import logging
import os
import pathlib
import struct
from collections.abc import Iterable

import numpy as np
import soundfile as sf
import soxr

from data_pipelines import video
from data_pipelines.builders.inputs import Item, expand_inputs, transcript_fields
from data_pipelines.builders.policy import Warn
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import DataError, Episode, validate

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")
PAIR_TOLERANCE_SECONDS = 0.001
LOW_SAMPLE_RATE = video.LOW_SAMPLE_RATE


def check_finite(audio: np.ndarray, where: str, time_axis: int) -> None:
  """Raises DataError "non_finite" for NaN/Inf in 2-D audio whose samples run along `time_axis`."""
  bad = ~np.isfinite(audio)
  if bad.any():
    first = int(np.argmax(bad.any(axis=1 - time_axis)))
    raise DataError("non_finite", where, f"{int(bad.sum())} NaN/Inf samples (first at sample {first})")


def to_int16(audio: np.ndarray) -> np.ndarray:
  """Float audio in [-1, 1] (clipped) to int16."""
  return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def warn_clipping(audio: np.ndarray, where: str, warn: Warn) -> None:
  """Warns "clipped" when float audio [N, ...] has samples outside [-1, 1] (which `to_int16` clips)."""
  count, peak = 0, 0.0
  for start in range(0, len(audio), 1 << 20):  # bounded temporaries however long the recording
    block = np.abs(audio[start : start + (1 << 20)])
    count += int(np.count_nonzero(block > 1.0))
    peak = max(peak, float(block.max(initial=0.0)))
  if count:
    warn("clipped", f"{where}: {count} samples outside [-1, 1] (peak {peak:.3g}) are clipped")


def _resample(audio: np.ndarray, rate: int, where: str, warn: Warn) -> np.ndarray:
  """[N, C] float32 at `rate` to 16 kHz; warns "resampled_below_8khz" for rates below 8 kHz."""
  if rate == SAMPLE_RATE:
    return audio
  if rate < LOW_SAMPLE_RATE:
    warn("resampled_below_8khz", f"{where}: recorded at {rate} Hz; resampled to {SAMPLE_RATE} Hz")
  else:
    log.info("%s: resampling %d Hz to %d Hz", where, rate, SAMPLE_RATE)
  return np.asarray(soxr.resample(audio, rate, SAMPLE_RATE), np.float32).reshape(-1, audio.shape[1])


_WAV_FRAME_CODECS = {1, 3, 6, 7}  # PCM, IEEE float, A-law, mu-law: one block per frame
_UNKNOWN_SIZES = {0, 0xFFFFFFFF}  # what streaming writers leave in a size they never filled in


def _wav_header_frames(path: str | os.PathLike) -> int | None:
  """The frame count a RIFF/RF64 WAV's data chunk declares, or None when the header does not say.

  libsndfile reports the frames a truncated file holds, not those its header promises, so the
  header is read here: frames = data chunk bytes / block align, for PCM, float, A-law and mu-law.
  """
  try:
    with open(path, "rb") as f:
      riff = f.read(12)
      if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:] != b"WAVE":
        return None
      block, long_size = None, None
      while len(head := f.read(8)) == 8:
        chunk, size = head[:4], struct.unpack("<I", head[4:])[0]
        if chunk == b"data":
          if riff[:4] == b"RF64" and size == 0xFFFFFFFF:
            size = long_size
          return None if not block or size is None or size in _UNKNOWN_SIZES else size // block
        if chunk in (b"fmt ", b"ds64"):
          body = f.read(size)
          if chunk == b"ds64" and len(body) >= 16:
            long_size = struct.unpack("<Q", body[8:16])[0]
          elif chunk == b"fmt " and len(body) >= 16:
            codec, block = struct.unpack("<H", body[:2])[0], struct.unpack("<H", body[12:14])[0]
            if codec == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the codec opens the sub-format
              codec = struct.unpack("<H", body[24:26])[0]
            if codec not in _WAV_FRAME_CODECS:
              return None
        else:
          f.seek(size, os.SEEK_CUR)
        f.seek(size % 2, os.SEEK_CUR)  # chunks are padded to an even size
  except OSError:
    return None
  return None


def _read_audio(path: pathlib.Path, allow_truncated: bool, warn: Warn) -> tuple[np.ndarray, int]:
  """[N, C] float32 audio and its rate; DataError "truncated" if it holds fewer frames than promised."""
  try:
    declared = sf.info(str(path)).frames
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
  except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
    raise DataError("audio", str(path), f"cannot read audio: {e}") from None
  if declared >= 2**62:  # libsndfile's way of saying it does not know
    declared = 0
  promised = max(declared, _wav_header_frames(path) or 0)
  if len(audio) < promised:
    held = f"holds {len(audio)} of the {promised} frames its header promises ({len(audio) / rate:.3f} s of"
    held += f" {promised / rate:.3f} s)"
    if not allow_truncated:
      raise DataError("truncated", str(path), held)
    warn("truncated_kept", f"{path}: kept although it {held}")
  check_finite(audio, str(path), time_axis=0)
  return audio, rate


def audio_items(inputs: Iterable[str | os.PathLike]) -> list[Item]:
  """One item per stereo file or user/model pair (a missing half is "" in `files`), in input order."""
  entries: list[tuple[str, str, list[str]]] = []  # (stem, id, files), in the order of each one's first file
  pairs: dict[str, list[str]] = {}
  for f in expand_inputs(inputs, AUDIO_SUFFIXES):
    base = f.name[: -len(f.suffix)]
    role = base.rsplit(".", 1)[-1] if "." in base else None
    if role in ("user", "model"):
      stem = f.parent / base[: -len(role) - 1]
      if str(stem) not in pairs:
        pairs[str(stem)] = ["", ""]
        entries.append((str(stem), stem.name, pairs[str(stem)]))
      pairs[str(stem)][0 if role == "user" else 1] = str(f)
    else:
      entries.append((str(f.parent / base), base, [str(f)]))
  return [Item(id=name, where=group[0] or group[1], files=tuple(group), stem=stem) for stem, name, group in entries]


def audio_episode(item: Item, warn: Warn, swap_channels: bool, allow_truncated: bool, options: dict) -> Episode:
  """The episode of one audio item (`audio_items`), validated; DataError when it cannot be built."""
  stem = pathlib.Path(item.stem)
  group = [pathlib.Path(f) if f else None for f in item.files]
  where = item.where
  if len(group) == 1:
    audio, rate = _read_audio(group[0], allow_truncated, warn)
    if audio.shape[1] != 2:
      raise DataError("audio", where, f"has {audio.shape[1]} channels; a single file must be stereo (user, model)")
    sources = group[0].name
  else:
    missing = "user" if group[0] is None else "model" if group[1] is None else None
    if missing:
      raise DataError(
        "missing", where, f"the {missing} channel is missing: no {stem.name}.{missing} file to pair it with"
      )
    (user, rate), (model, model_rate) = (_read_audio(f, allow_truncated, warn) for f in group)
    for f, a in zip(group, (user, model)):
      if a.shape[1] != 1:
        raise DataError("audio", str(f), f"has {a.shape[1]} channels; paired files must be mono")
    if rate != model_rate:
      raise DataError("sample_rate", where, f"user file is {rate} Hz but model file {group[1].name} is {model_rate} Hz")
    diff = len(user) - len(model)
    if abs(diff) > round(rate * PAIR_TOLERANCE_SECONDS):
      raise DataError(
        "length", where, f"user file has {len(user)} samples but model file {group[1].name} has {len(model)}"
      )
    pad = lambda a, n: np.pad(a, ((0, n), (0, 0)))
    audio = np.concatenate([pad(user, max(-diff, 0)), pad(model, max(diff, 0))], axis=1)
    sources = f"{group[0].name},{group[1].name}"
  audio = _resample(audio, rate, where, warn)
  warn_clipping(audio, where, warn)
  if swap_channels:
    audio = audio[:, ::-1]
  fields, transcript = transcript_fields(stem, options)
  ep = Episode(
    id=item.id,
    duration=len(audio) / SAMPLE_RATE,
    user_audio=to_int16(audio[:, 0]),
    model_audio=to_int16(audio[:, 1]),
    meta={"builder": "audio", "source": sources, "transcript": transcript, "source_sample_rate": str(rate)},
    **fields,
  )
  validate(ep, f"{where} (transcript {transcript})")
  return ep
