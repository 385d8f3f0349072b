"""Builds episode datasets (`data_pipelines.episode`) from recordings, videos and text documents.

    python -m data_pipelines.build audio INPUT... --out=DIR [--swap_channels]
        [--user_tier=user] [--model_tier=model] [--ctm_channels=A=user,1=user,B=model,2=model]
    python -m data_pipelines.build video INPUT... --out=DIR [--fps=5] [--width=320] [--height=240] [--swap_channels]
    python -m data_pipelines.build text INPUT... --out=DIR [--words_per_second=10]
    common flags: --on_error=skip|raise (default skip), --episodes_per_shard=64
    audio and video: --allow_truncated (keep what a truncated file holds, with a warning)

An INPUT is a file, a directory (searched recursively for the kind's file types) or a glob pattern.

- audio: a stereo `<stem>.wav` or `<stem>.flac` (channel 0 the user, 1 the model; `--swap_channels`
  swaps them), or a mono pair `<stem>.user.wav` + `<stem>.model.wav` (or .flac) with equal sample
  rates and lengths equal within 1 ms (the shorter is padded with silence). Audio at another rate
  is resampled to 16 kHz.
- video: `<stem>.mp4` (also .m4v, .mov) with an audio track: stereo is user and model, mono is the
  user with a silent model. Frames are sampled at `--fps` and resized to `--width` x `--height`
  (multiples of 40).
- Each recording or video needs a transcript beside it: `<stem>.json`, `<stem>.TextGrid` or
  `<stem>.ctm` (formats in `data_pipelines.transcripts`).
- text: `.txt` files (the whole file is the model's text, blank lines separate paragraphs) and
  `.jsonl` files, one document per line: {"turns": [{"speaker": "user" | "model", "text": str}, ...]}.
  A text-only episode has no audio. The first micro-turn is left empty; the model's words then
  follow one another at `--words_per_second`; a user turn becomes a `typed_text` event at the time
  it occurs, and the model's next words start in the following micro-turn. A paragraph ends with
  "\\n\\n" on its last word and one silent micro-turn. The episode ends 0.2 s after its last word or event.

Media are read only as far as they hold, never as far as they claim. A WAV whose data chunk (or any
file whose header) promises more frames than it holds, and an MP4/MOV that ends inside one of its
boxes or whose video or audio ends before its declared end, is "truncated": skipped, or with
`--allow_truncated` kept as far as it goes. A video frame past the file's declared duration or far
past the end of its audio (limits in `data_pipelines.video.decode_mp4`) makes the file a
"timestamps" skip, found before any memory is spent on the gap: the time is what is wrong, not the
decoding.

Episode ids are the file stems (for .jsonl: `<stem>-<line number>`) and must be unique. Every episode
is validated; a bad input is skipped and counted by its DataError reason (`--on_error=raise` raises
instead): "audio" (unreadable, or the wrong channel count), "missing" (half of a pair), "length"
(mismatched halves of a pair), "empty" (a document with no text), "sample_rate", "non_finite",
"transcript" (missing or malformed transcript or .jsonl line), "timestamps", "video", "truncated" and
"duplicate". A written episode may carry warnings, each logged with its file and counted once per
episode: "clipped" (audio outside [-1, 1], clipped to int16), "resampled_below_8khz" (recorded below
8 kHz) and "truncated_kept" (a truncated file kept with --allow_truncated).

`--out` is checked before any input is read: it must be a directory, or creatable as one, that can be
written to. Episodes are written there (shards left by an earlier build are removed), then a summary
is printed: `episodes written: N`, `skipped: M` and one line per reason, `warnings: K` and one line
per kind. The exit status is non-zero when no episode was written; a bad `--out` (status 2) or a
failed write (status 1, e.g. disk full) ends the build with a one-line error naming the path.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import json
import logging
import math
import os
import pathlib
import re
import struct
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import soundfile as sf
import soxr

from data_pipelines import transcripts, video
from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE
from data_pipelines.episode import (
  MANIFEST,
  DataError,
  Episode,
  Event,
  Word,
  validate,
  write_dataset,
)
from tmlx import paths

log = logging.getLogger("data_pipelines.build")

AUDIO_SUFFIXES = (".wav", ".flac")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
TEXT_SUFFIXES = (".txt", ".jsonl")
PAIR_TOLERANCE_SECONDS = 0.001
ON_ERROR = ("skip", "raise")
WARNINGS = ("clipped", "resampled_below_8khz", "truncated_kept")  # kinds of warnings a written episode may carry
LOW_SAMPLE_RATE = video.LOW_SAMPLE_RATE

Warn = Callable[[str, str], None]  # warn(kind, message): notes a warning about the episode being built


def expand_inputs(inputs: Iterable[str | os.PathLike], suffixes: Sequence[str]) -> list[pathlib.Path]:
  """Files named by `inputs` (files, directories searched recursively, glob patterns), sorted and unique."""
  found: list[pathlib.Path] = []
  wanted = tuple(s.lower() for s in suffixes)
  for item in inputs:
    text = str(item)
    path = pathlib.Path(text)
    if path.is_dir():
      found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.name.lower().endswith(wanted))
    elif path.is_file():
      found.append(path)
    elif glob.has_magic(text):
      matches = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True))
      found.extend(p for p in matches if p.is_file() and p.name.lower().endswith(wanted))
    else:
      raise FileNotFoundError(f"{text}: no such file, directory or glob match")
  seen, out = set(), []
  for p in found:
    if p not in seen:
      seen.add(p)
      out.append(p)
  return out


class _Policy:
  """Applies --on_error to DataErrors and counts skips by reason, and warnings of kept episodes by kind."""

  def __init__(self, on_error: str, warnings: collections.Counter | None = None):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error is {on_error!r}; want one of {ON_ERROR}")
    self.on_error = on_error
    self.skips: collections.Counter = collections.Counter()
    self.warnings = collections.Counter() if warnings is None else warnings

  def __call__(self, error: DataError) -> None:
    if self.on_error == "raise":
      raise error
    log.warning("skipped (%s) %s", error.reason, error)
    self.skips[error.reason] += 1

  def kept(self, notes: list[tuple[str, str]]) -> None:
    """Logs the warnings of an episode that was kept and counts each kind once."""
    for kind, message in notes:
      if kind not in WARNINGS:
        raise ValueError(f"warning kind {kind!r} is not one of {WARNINGS}")
      log.warning("warning (%s) %s", kind, message)
    for kind in dict.fromkeys(kind for kind, _ in notes):
      self.warnings[kind] += 1


def find_transcript(stem: pathlib.Path) -> pathlib.Path:
  """The single transcript `<stem>.json`, `<stem>.TextGrid` (any case) or `<stem>.ctm` beside a media file."""
  found: list[pathlib.Path] = []
  for suffix in transcripts.SUFFIXES:
    path = stem.parent / f"{stem.name}{suffix}"
    if path.is_file() and not any(path.samefile(f) for f in found):  # .TextGrid and .textgrid may be one file
      found.append(path)
  if not found:
    raise DataError("transcript", str(stem), f"no transcript beside it (want {stem.name}.json, .TextGrid or .ctm)")
  if len(found) > 1:
    raise DataError("transcript", str(stem), f"several transcripts beside it: {[p.name for p in found]}")
  return found[0]


def _check_finite(audio: np.ndarray, where: str, time_axis: int) -> None:
  """Raises DataError "non_finite" for NaN/Inf in 2-D audio whose samples run along `time_axis`."""
  bad = ~np.isfinite(audio)
  if bad.any():
    first = int(np.argmax(bad.any(axis=1 - time_axis)))
    raise DataError("non_finite", where, f"{int(bad.sum())} NaN/Inf samples (first at sample {first})")


def to_int16(audio: np.ndarray) -> np.ndarray:
  """Float audio in [-1, 1] (clipped) to int16."""
  return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def _warn_clipping(audio: np.ndarray, where: str, warn: Warn) -> None:
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
  _check_finite(audio, str(path), time_axis=0)
  return audio, rate


def _transcript_fields(stem: pathlib.Path, options: dict) -> tuple[dict, str]:
  path = find_transcript(stem)
  t = transcripts.load_transcript(path, **options)
  fields = {
    "user_words": t.user_words,
    "model_words": t.model_words,
    "typed_text": t.typed_text,
    "bg_calls": t.bg_calls,
    "bg_results": t.bg_results,
  }
  return fields, path.name


def _audio_sources(files: list[pathlib.Path]) -> list[tuple[pathlib.Path, list[pathlib.Path | None]]]:
  """Groups audio files into (stem, [stereo file]) or (stem, [user file, model file])."""
  sources: list[tuple[pathlib.Path, list[pathlib.Path | None]]] = []
  pairs: dict[pathlib.Path, list[pathlib.Path | None]] = {}
  for f in files:
    base = f.name[: -len(f.suffix)]
    role = base.rsplit(".", 1)[-1] if "." in base else None
    if role in ("user", "model"):
      stem = f.parent / base[: -len(role) - 1]
      if stem not in pairs:
        pairs[stem] = [None, None]
        sources.append((stem, pairs[stem]))
      pairs[stem][0 if role == "user" else 1] = f
    else:
      sources.append((f.parent / base, [f]))
  return sources


def _audio_episode(
  warn: Warn, stem: pathlib.Path, group: list, swap_channels: bool, allow_truncated: bool, options: dict
) -> Episode:
  where = str(group[0] or group[1])
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
  _warn_clipping(audio, where, warn)
  if swap_channels:
    audio = audio[:, ::-1]
  fields, transcript = _transcript_fields(stem, options)
  ep = Episode(
    id=stem.name,
    duration=len(audio) / SAMPLE_RATE,
    user_audio=to_int16(audio[:, 0]),
    model_audio=to_int16(audio[:, 1]),
    meta={"builder": "audio", "source": sources, "transcript": transcript, "source_sample_rate": str(rate)},
    **fields,
  )
  validate(ep, f"{where} (transcript {transcript})")
  return ep


def _transcript_options(user_tier: str, model_tier: str, ctm_channels: dict[str, str] | None) -> dict:
  return {"user_tier": user_tier, "model_tier": model_tier, "channels": ctm_channels}


def _collect(items, make, policy: _Policy) -> list[Episode]:
  """Runs `make(warn, *args)` (which validates) on each (id, where, *args) item, de-duplicating ids.

  Errors go to `policy`, and so do the warnings of each episode kept.
  """
  episodes, seen = [], set()
  for ep_id, where, *args in items:
    notes: list[tuple[str, str]] = []
    try:
      if ep_id in seen:
        raise DataError("duplicate", where, f"episode id {ep_id!r} (the file stem) is already taken by another input")
      ep = make(lambda kind, message, notes=notes: notes.append((kind, message)), *args)
      seen.add(ep_id)
      episodes.append(ep)
      policy.kept(notes)
    except DataError as e:
      policy(e)
  return episodes


def build_audio_episodes(
  inputs: Iterable[str | os.PathLike],
  *,
  swap_channels: bool = False,
  on_error: str = "skip",
  user_tier: str = "user",
  model_tier: str = "model",
  ctm_channels: dict[str, str] | None = None,
  allow_truncated: bool = False,
  warnings: collections.Counter | None = None,
) -> tuple[list[Episode], collections.Counter]:
  """Audio episodes from stereo or paired WAV/FLAC recordings with transcripts; returns (episodes, skips).

  Truncated files are skipped unless `allow_truncated`; the warnings of written episodes are counted
  into `warnings` when it is given.
  """
  policy = _Policy(on_error, warnings)
  options = _transcript_options(user_tier, model_tier, ctm_channels)
  sources = _audio_sources(expand_inputs(inputs, AUDIO_SUFFIXES))
  items = [(stem.name, str(group[0] or group[1]), stem, group) for stem, group in sources]
  make = lambda warn, stem, group: _audio_episode(warn, stem, group, swap_channels, allow_truncated, options)
  return _collect(items, make, policy), policy.skips


def _video_episode(
  warn: Warn,
  path: pathlib.Path,
  fps: float,
  width: int,
  height: int,
  swap_channels: bool,
  allow_truncated: bool,
  options: dict,
) -> Episode:
  where = str(path)
  frames, times, audio = video.decode_mp4(
    path, fps=fps, width=width, height=height, allow_truncated=allow_truncated, warn=warn
  )
  _check_finite(audio, where, time_axis=1)
  _warn_clipping(audio.T, where, warn)
  if swap_channels and len(audio) == 2:
    audio = audio[::-1]
  user = audio[0]
  model = audio[1] if len(audio) == 2 else np.zeros_like(user)
  duration = len(user) / SAMPLE_RATE
  keep = times < duration
  fields, transcript = _transcript_fields(path.with_suffix(""), options)
  ep = Episode(
    id=path.stem,
    duration=duration,
    user_audio=to_int16(user),
    model_audio=to_int16(model),
    frames=np.ascontiguousarray(frames[keep]),
    frame_times=times[keep],
    meta={
      "builder": "video",
      "source": path.name,
      "transcript": transcript,
      "fps": str(fps),
      "frame_size": f"{width}x{height}",
      "audio_channels": str(len(audio)),
    },
    **fields,
  )
  validate(ep, f"{where} (transcript {transcript})")
  return ep


def build_video_episodes(
  inputs: Iterable[str | os.PathLike],
  *,
  fps: float = 5.0,
  width: int = 320,
  height: int = 240,
  swap_channels: bool = False,
  on_error: str = "skip",
  user_tier: str = "user",
  model_tier: str = "model",
  ctm_channels: dict[str, str] | None = None,
  allow_truncated: bool = False,
  warnings: collections.Counter | None = None,
) -> tuple[list[Episode], collections.Counter]:
  """Audio-visual episodes from video files with transcripts; returns (episodes, skips).

  Truncated files are skipped unless `allow_truncated`; the warnings of written episodes are counted
  into `warnings` when it is given.
  """
  if width <= 0 or height <= 0 or width % video.PATCH or height % video.PATCH:
    raise ValueError(f"frame size {width}x{height}: width and height must be positive multiples of {video.PATCH}")
  if not fps > 0:
    raise ValueError(f"fps is {fps}; it must be positive")
  policy = _Policy(on_error, warnings)
  options = _transcript_options(user_tier, model_tier, ctm_channels)
  items = [(p.stem, str(p), p) for p in expand_inputs(inputs, VIDEO_SUFFIXES)]
  make = lambda warn, path: _video_episode(warn, path, fps, width, height, swap_channels, allow_truncated, options)
  return _collect(items, make, policy), policy.skips


class _TextClock:
  """Places a text-only conversation on a timeline (rules in the module docstring)."""

  def __init__(self, words_per_second: float):
    self.step = 1.0 / words_per_second
    self.t = MICRO_TURN_SECONDS
    self.words: list[Word] = []
    self.typed: list[Event] = []

  def _next_window(self) -> None:
    self.t = (math.floor(self.t / MICRO_TURN_SECONDS + 1e-9) + 1) * MICRO_TURN_SECONDS

  def model(self, text: str) -> None:
    for i, paragraph in enumerate(_paragraphs(text)):
      if i:
        self.words[-1] = Word(self.words[-1].start, self.words[-1].end, self.words[-1].text + "\n\n")
        self._next_window()
      for word in paragraph:
        self.words.append(Word(self.t, self.t + self.step, word))
        self.t += self.step

  def user(self, text: str) -> None:
    self.typed.append(Event(self.t, text.strip()))
    self._next_window()

  def episode(self, ep_id: str, meta: dict) -> Episode:
    end = max([w.end for w in self.words] + [e.time for e in self.typed])
    return Episode(
      id=ep_id, duration=end + MICRO_TURN_SECONDS, model_words=self.words, typed_text=self.typed, meta=meta
    )


def _paragraphs(text: str) -> list[list[str]]:
  return [p.split() for p in re.split(r"\n\s*\n", text) if p.split()]


def _text_documents(path: pathlib.Path) -> Iterable[tuple[str, str, list[tuple[str, str]] | DataError]]:
  """Yields (id, source, turns) per document, or a DataError in place of the turns of a bad one."""
  where = str(path)
  try:
    content = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    yield path.stem, path.name, DataError("transcript", where, f"cannot read: {e}")
    return
  if path.suffix.lower() == ".txt":
    yield path.stem, path.name, [("model", content)]
    return
  for lineno, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    yield f"{path.stem}-{lineno}", f"{path.name}:{lineno}", _jsonl_turns(line, where, lineno)


def _jsonl_turns(line: str, where: str, lineno: int) -> list[tuple[str, str]] | DataError:
  try:
    doc = json.loads(line)
  except json.JSONDecodeError as e:
    return DataError("transcript", where, f"line {lineno}: invalid JSON: {e.msg}")
  turns = doc.get("turns") if isinstance(doc, dict) else None
  if not isinstance(turns, list):
    return DataError("transcript", where, f'line {lineno}: want an object with a "turns" list')
  out = []
  for i, turn in enumerate(turns):
    ok = isinstance(turn, dict) and turn.get("speaker") in ("user", "model") and isinstance(turn.get("text"), str)
    if not ok:
      return DataError(
        "transcript", where, f'line {lineno}: turns[{i}] is {turn!r}; want {{"speaker": "user"|"model", "text": str}}'
      )
    out.append((turn["speaker"], turn["text"]))
  return out


def _text_episode(ep_id: str, source: str, turns, where: str, words_per_second: float) -> Episode:
  if isinstance(turns, DataError):
    raise turns
  clock = _TextClock(words_per_second)
  for speaker, text in turns:
    if not text.strip():
      continue
    (clock.model if speaker == "model" else clock.user)(text)
  if not clock.words and not clock.typed:
    raise DataError("empty", where, f"document {source} has no text")
  ep = clock.episode(ep_id, {"builder": "text", "source": source, "words_per_second": str(words_per_second)})
  validate(ep, f"{where} (document {source})")
  return ep


def build_text_episodes(
  inputs: Iterable[str | os.PathLike], *, words_per_second: float = 10.0, on_error: str = "skip"
) -> tuple[list[Episode], collections.Counter]:
  """Text-only episodes from .txt and .jsonl documents; returns (episodes, skips)."""
  if not words_per_second > 0:
    raise ValueError(f"words_per_second is {words_per_second}; it must be positive")
  policy = _Policy(on_error)
  items = [
    (ep_id, str(path), ep_id, source, turns, str(path))
    for path in expand_inputs(inputs, TEXT_SUFFIXES)
    for ep_id, source, turns in _text_documents(path)
  ]
  make = lambda warn, *document: _text_episode(*document, words_per_second)
  return _collect(items, make, policy), policy.skips


def write_episodes(episodes: list[Episode], out: str | os.PathLike, episodes_per_shard: int = 64) -> int:
  """Writes a dataset to `out` (a directory or an object-store URL, written locally and then copied:
  `write_dataset`), removing shards of an earlier build that the new manifest does not list."""
  write_dataset(episodes, out, episodes_per_shard=episodes_per_shard)
  keep = set(json.loads(paths.read_text(paths.join(out, MANIFEST)))["shards"])
  for name in paths.listdir(out):
    if fnmatch.fnmatch(name, "episodes-*-of-*.array_record") and name not in keep:
      paths.remove(paths.join(out, name))
  return len(episodes)


def summary(written: int, skips: collections.Counter, warnings: collections.Counter | None = None) -> str:
  """The build summary: episodes written, skipped, one line per skip reason, then (if counted) the warnings."""
  lines = [f"episodes written: {written}", f"skipped: {sum(skips.values())}"]
  lines += [f"  {reason}: {n}" for reason, n in sorted(skips.items())]
  if warnings is not None:
    lines.append(f"warnings: {sum(warnings.values())}")
    lines += [f"  {kind}: {n}" for kind, n in sorted(warnings.items())]
  return "\n".join(lines)


class OutputError(Exception):
  """A dataset directory that cannot be used or written; `status` is the exit status it ends a build with."""

  def __init__(self, message: str, status: int = 1):
    super().__init__(message)
    self.status = status


def check_out(out: str | os.PathLike) -> None:
  """Raises OutputError (status 2) unless `out` is a writable directory or can be created as one
  (an object-store URL: unless an object has that name; whether the bucket takes writes shows when
  the dataset is copied there)."""
  if paths.is_remote(out):
    if paths.is_file(out):
      raise OutputError(f"--out {out}: exists and is not a directory", 2)
    return
  path = pathlib.Path(out)
  if os.path.lexists(path) and not path.is_dir():
    raise OutputError(f"--out {path}: exists and is not a directory", 2)
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise OutputError(f"--out {path}: cannot be created, {existing} is not a directory", 2)
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created, {existing} is not writable"
    raise OutputError(f"--out {path}: {what}", 2)


def _channel_map(text: str) -> dict[str, str]:
  out = {}
  for item in text.split(","):
    key, sep, speaker = item.partition("=")
    if not sep or speaker not in transcripts.SPEAKERS:
      raise argparse.ArgumentTypeError(f"{item!r}: want CHANNEL=user or CHANNEL=model")
    out[key] = speaker
  return out


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m data_pipelines.build", description="Builds an episode dataset from raw inputs."
  )
  kinds = parser.add_subparsers(dest="kind", required=True)

  def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files, directories (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--on_error", choices=ON_ERROR, default="skip", help="skip and count bad inputs, or raise")
    p.add_argument("--episodes_per_shard", type=int, default=64)

  def media(p: argparse.ArgumentParser) -> None:
    p.add_argument("--swap_channels", action="store_true", help="channel 0 is the model, 1 the user")
    p.add_argument(
      "--allow_truncated", action="store_true", help="keep what a truncated file holds (counted as a warning)"
    )
    p.add_argument("--user_tier", default="user", help="TextGrid interval tier of the user's words")
    p.add_argument("--model_tier", default="model", help="TextGrid interval tier of the model's words")
    p.add_argument("--ctm_channels", type=_channel_map, default=None, help="CTM channel mapping, e.g. A=user,B=model")

  audio = kinds.add_parser("audio", help="stereo or paired WAV/FLAC recordings with transcripts")
  common(audio)
  media(audio)
  vid = kinds.add_parser("video", help="MP4 videos with an audio track and transcripts")
  common(vid)
  media(vid)
  vid.add_argument("--fps", type=float, default=5.0)
  vid.add_argument("--width", type=int, default=320)
  vid.add_argument("--height", type=int, default=240)
  text = kinds.add_parser("text", help="text documents (.txt, .jsonl chats)")
  common(text)
  text.add_argument("--words_per_second", type=float, default=10.0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    return _run(args)
  except DataError:
    raise
  except OutputError as e:
    parser.exit(e.status, f"{parser.prog}: error: {e}\n")
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))


def _run(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  check_out(args.out)
  warnings: collections.Counter = collections.Counter()
  media = {}
  if args.kind in ("audio", "video"):
    media = dict(
      swap_channels=args.swap_channels,
      user_tier=args.user_tier,
      model_tier=args.model_tier,
      ctm_channels=args.ctm_channels,
      allow_truncated=args.allow_truncated,
      warnings=warnings,
    )
  if args.kind == "audio":
    episodes, skips = build_audio_episodes(args.inputs, on_error=args.on_error, **media)
  elif args.kind == "video":
    episodes, skips = build_video_episodes(
      args.inputs, fps=args.fps, width=args.width, height=args.height, on_error=args.on_error, **media
    )
  else:
    episodes, skips = build_text_episodes(args.inputs, words_per_second=args.words_per_second, on_error=args.on_error)
  try:
    written = write_episodes(episodes, args.out, args.episodes_per_shard) if episodes else 0
  except (OSError, RuntimeError) as e:  # ArrayRecordWriter reports a failed write as a RuntimeError
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise OutputError(f"cannot write the dataset to {args.out}: {message}") from None
  print(summary(written, skips, warnings))
  return 0 if written else 1


if __name__ == "__main__":
  sys.exit(main())
