"""Video frames: MP4 decoding to fixed-rate RGB frames with 16 kHz audio, 40x40 patches, and MP4 rendering.

All times are seconds on the container's clock (pts 0 is time 0), so decoded frames and audio stay
aligned however the file's streams were encoded.
"""

from __future__ import annotations

import fractions
import logging
import math
import os
import struct
from collections.abc import Callable

import av
import numpy as np

from data_pipelines.contract import PATCH_SIZE as PATCH
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import DataError

log = logging.getLogger("data_pipelines.video")

_LAYOUTS = {1: "mono", 2: "stereo"}
_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}
DURATION_SLACK_SECONDS = 1.0  # a frame may end this far past the file's declared duration
AUDIO_SLACK_SECONDS = 10.0  # video may run on this far past the end of the audio (and audio start this late)
TRUNCATION_SLACK_SECONDS = 0.25  # a track may end this much before its declared end without being "truncated"
LOW_SAMPLE_RATE = 8000  # audio recorded below this rate is resampled with a warning


def _codec(candidates: tuple[str, ...]) -> str:
  for name in candidates:
    try:
      av.codec.Codec(name, "w")
      return name
    except Exception:  # PyAV raises UnknownCodecError, or ValueError in older releases
      continue
  raise RuntimeError(f"the bundled FFmpeg has none of the encoders {candidates}")


def decode_mp4(
  path: str | os.PathLike,
  *,
  fps: float,
  width: int,
  height: int,
  allow_truncated: bool = False,
  warn: Callable[[str, str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Decodes a video file into frames at `fps`, resized to `width` x `height`, and its audio at 16 kHz.

  Frame k shows time k/fps (k = 0, 1, ... while k/fps is before the end of the video stream): it is
  the latest decoded frame whose presentation time is at or before k/fps (the first frame for
  times before it), so the file's frame rate need not match `fps`. The audio track keeps its
  channels (mono or stereo) and is placed on the same clock: a late start is padded with silence,
  samples before time 0 are dropped.

  Decoding is bounded by what the file declares and holds: a frame shown more than
  DURATION_SLACK_SECONDS past the declared duration, video more than AUDIO_SLACK_SECONDS past the
  end of the audio, or audio starting that far past the end of the video raises DataError
  "timestamps" before any memory is spent on the gap, so memory follows the frames and samples the
  file holds, not the times it claims. A file holding less than it declares (a top-level box running
  past the end of the file, or a track ending more than TRUNCATION_SLACK_SECONDS before its declared
  end) raises DataError "truncated"; with `allow_truncated` what it holds is returned and
  `warn("truncated_kept", message)` is called. Audio recorded below 8 kHz calls
  `warn("resampled_below_8khz", message)`. Without `warn`, warnings are logged.

  Returns (frames uint8 [T, height, width, 3], frame_times float64 [T], audio float32 [C, N]).
  Raises DataError "video" for unreadable files, a missing video or audio track, or more than two
  audio channels.
  """
  where = str(path)
  if not fps > 0 or width <= 0 or height <= 0:
    raise ValueError(f"fps {fps}, width {width} and height {height} must be positive")
  if warn is None:
    warn = lambda kind, message: log.warning("warning (%s) %s", kind, message)
  cut = _box_shortfall(where)
  broken = lambda message: (
    DataError("truncated", where, f"{cut}; {message}") if cut else DataError("video", where, message)
  )
  try:
    container = av.open(where)
  except (av.FFmpegError, OSError) as e:
    raise broken(f"cannot open: {e}") from None
  with container:
    if not container.streams.video:
      raise broken("no video track")
    if not container.streams.audio:
      raise broken("no audio track")
    vstream, astream = container.streams.video[0], container.streams.audio[0]
    for stream in (vstream, astream):
      if stream.codec_context is None:
        raise broken(f"its {stream.type} track cannot be decoded")
    vstream.thread_type = "AUTO"
    limits = _Limits(where, container, vstream, astream)
    frames = _FrameSampler(fps, width, height, vstream, limits)
    audio = _AudioCollector(astream, where, limits)
    error = None
    try:
      for packet in container.demux(vstream, astream):
        for frame in packet.decode():
          (frames if packet.stream is vstream else audio).add(frame)
    except av.FFmpegError as e:
      error = e
      for stream, sink in ((vstream, frames), (astream, audio)):  # frames the decoders still hold
        try:
          for frame in stream.codec_context.decode(None):
            frame.time_base = stream.time_base  # flushed frames come without one
            sink.add(frame)
        except av.FFmpegError:
          pass
    frames.flush()
    missing = _shortfalls(cut, frames, vstream, audio)
    rate = astream.codec_context.sample_rate
  if error is not None and not missing:
    raise DataError("video", where, f"cannot decode: {error}")
  if missing:
    if not allow_truncated:
      raise DataError("truncated", where, f"holds less than it declares: {missing}")
    warn("truncated_kept", f"{where}: kept what it holds, less than it declares: {missing}")
  if not frames.count:
    raise DataError("video", where, "the video track has no frames")
  audio_end = audio.held_end()
  if frames.end > audio_end + AUDIO_SLACK_SECONDS:
    raise DataError(
      "timestamps", where, f"video runs to {frames.end:.2f} s, far past the end of its audio at {audio_end:.2f} s"
    )
  if audio.start is not None and audio.start > frames.end + AUDIO_SLACK_SECONDS:
    raise DataError(
      "timestamps",
      where,
      f"the audio starts at {audio.start:.2f} s, far past the end of the video at {frames.end:.2f} s",
    )
  if rate and rate < LOW_SAMPLE_RATE:
    warn("resampled_below_8khz", f"{where}: the audio track is recorded at {rate} Hz; resampled to {SAMPLE_RATE} Hz")
  images, times = frames.finish()
  return images, times, audio.finish()


def _stream_end(stream) -> float | None:
  """The end time in seconds that a stream's header declares, or None."""
  if not stream.duration or stream.time_base is None:
    return None
  return float(((stream.start_time or 0) + stream.duration) * stream.time_base)


class _Limits:
  """The latest times a file's frames may have: its declared duration, and for video its declared audio end."""

  def __init__(self, where: str, container, vstream, astream):
    self.where = where
    ends = [e for e in (_stream_end(vstream), _stream_end(astream)) if e is not None]
    if container.duration:
      ends.append(((container.start_time or 0) + container.duration) / av.time_base)
    self.declared = max(ends) if ends else None
    self.audio = _stream_end(astream)

  def check(self, kind: str, start: float, end: float) -> None:
    """Raises DataError "timestamps" for a `kind` frame shown from `start` to `end` s beyond the limits."""
    if self.declared is not None and end > self.declared + DURATION_SLACK_SECONDS:
      raise DataError(
        "timestamps",
        self.where,
        f"a {kind} frame at {start:.2f} s ends at {end:.2f} s, past the declared duration {self.declared:.2f} s",
      )
    if kind == "video" and self.audio is not None and end > self.audio + AUDIO_SLACK_SECONDS:
      raise DataError(
        "timestamps",
        self.where,
        f"a video frame at {start:.2f} s is far past the end of the audio at {self.audio:.2f} s",
      )


def _box_shortfall(path: str) -> str | None:
  """Says how an MP4/MOV file ends inside one of its top-level boxes (a truncated file), or None."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      offset = 0
      while offset + 8 <= size:
        f.seek(offset)
        head = f.read(16)
        length, kind = struct.unpack(">I4s", head[:8])
        if offset == 0 and kind not in _FIRST_BOXES:
          return None  # not an ISO media file
        if not all(32 <= c < 127 for c in kind):
          return None  # trailing bytes after the last box, not a box: FFmpeg ignores them too
        if length == 1 and len(head) == 16:
          length = struct.unpack(">Q", head[8:])[0]
        if length == 0:
          return None  # the last box runs to the end of the file
        if length < 8:
          return None  # malformed; FFmpeg reports it
        if offset + length > size:
          name = kind.decode("latin-1")
          return f"the file ends {size - offset} bytes into its {length}-byte {name!r} box (at byte {offset})"
        offset += length
  except OSError:
    return None
  return None


def _shortfalls(cut: str | None, frames: _FrameSampler, vstream, audio: _AudioCollector) -> str:
  """What a decoded file lacks compared with its header ("" when nothing); `cut` from `_box_shortfall`."""
  found = [cut] if cut else []
  declared = _stream_end(vstream)
  if declared is not None and frames.end < declared - max(TRUNCATION_SLACK_SECONDS, 2 * frames.step):
    of = f" of {vstream.frames}" if vstream.frames else ""
    found.append(f"{frames.decoded}{of} video frames, to {frames.end:.2f} s of {declared:.2f} s")
  held = audio.held_end()
  if audio.end is not None and held < audio.end - TRUNCATION_SLACK_SECONDS:
    found.append(f"audio to {held:.2f} s of {audio.end:.2f} s")
  return "; ".join(found)


class _FrameSampler:
  """Keeps, for each target time k/fps, the latest frame presented at or before it.

  Frames are held as runs (image, number of targets it covers), one image per decoded frame that
  covers any target, and the output array is built only by `finish`, so memory follows the frames
  decoded; each frame's time is checked against `limits` before it extends a run.
  """

  def __init__(self, fps: float, width: int, height: int, stream, limits: _Limits):
    self.fps, self.width, self.height, self.limits = fps, width, height, limits
    self.step = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps
    self.runs: list[list] = []  # [image, count]
    self.count = 0  # targets covered so far
    self.decoded = 0
    self.current, self.rgb, self.end = None, None, 0.0

  def _targets_before(self, limit: float) -> int:
    """The number of targets k >= 0 with k/fps < limit (as the earlier loop counted them)."""
    n = max(math.ceil((limit - 1e-9) * self.fps), 0)
    while n > 0 and (n - 1) / self.fps >= limit - 1e-9:
      n -= 1
    while n / self.fps < limit - 1e-9:
      n += 1
    return n

  def _emit_until(self, limit: float) -> None:
    n = self._targets_before(limit) - self.count
    if n <= 0:
      return
    if self.rgb is None:
      self.rgb = self.current.reformat(width=self.width, height=self.height, format="rgb24").to_ndarray()
    if self.runs and self.runs[-1][0] is self.rgb:
      self.runs[-1][1] += n
    else:
      self.runs.append([self.rgb, n])
    self.count += n

  def add(self, frame) -> None:
    if frame.time is None or not math.isfinite(frame.time):
      return
    t = float(frame.time)
    end = t + (float(frame.duration * frame.time_base) if frame.duration else self.step)
    self.limits.check("video", t, end)
    self.decoded += 1
    if self.current is not None:
      self._emit_until(t)  # the first frame also covers targets before it
    self.current, self.rgb = frame, None
    self.end = max(self.end, end)

  def flush(self) -> None:
    """Covers the targets up to the end of the last frame."""
    if self.current is not None:
      self._emit_until(self.end)
    self.current, self.rgb = None, None

  def finish(self) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [T, height, width, 3], times float64 [T])."""
    self.flush()
    out = np.empty((self.count, self.height, self.width, 3), np.uint8)
    i = 0
    for image, n in self.runs:
      out[i : i + n] = image
      i += n
    self.runs = []
    return out, np.arange(self.count) / self.fps


class _AudioCollector:
  """Resamples decoded audio to 16 kHz float32 [C, N] so that sample 0 is time 0, cut at the track's end."""

  def __init__(self, stream, where: str, limits: _Limits):
    self.channels = stream.codec_context.channels
    if self.channels not in _LAYOUTS:
      raise DataError("video", where, f"the audio track has {self.channels} channels; want mono or stereo")
    self.resampler = av.AudioResampler(format="fltp", layout=_LAYOUTS[self.channels], rate=SAMPLE_RATE)
    self.limits = limits
    self.chunks: list[np.ndarray] = []
    self.samples = 0
    self.start: float | None = None
    self.end = _stream_end(stream)

  def add(self, frame) -> None:
    if frame.time is not None and math.isfinite(frame.time):
      t = float(frame.time)
      self.limits.check("audio", t, t + frame.samples / (frame.sample_rate or SAMPLE_RATE))
      if self.start is None:
        self.start = t
    for out in self.resampler.resample(frame):
      self.chunks.append(out.to_ndarray())
      self.samples += self.chunks[-1].shape[1]

  def held_end(self) -> float:
    """The time at which the audio decoded so far ends."""
    return (self.start or 0.0) + self.samples / SAMPLE_RATE

  def finish(self) -> np.ndarray:
    self.chunks.extend(out.to_ndarray() for out in self.resampler.resample(None))
    audio = np.concatenate(self.chunks, axis=1) if self.chunks else np.zeros((self.channels, 0), np.float32)
    offset = round((self.start or 0.0) * SAMPLE_RATE)
    if offset > 0:
      audio = np.concatenate([np.zeros((self.channels, offset), np.float32), audio], axis=1)
    elif offset < 0:
      audio = audio[:, -offset:]
    if self.end is not None:
      audio = audio[:, : max(round(self.end * SAMPLE_RATE), 0)]  # drops the decoder's padding of the last packet
    return np.ascontiguousarray(audio, dtype=np.float32)


def patchify(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cuts an RGB frame [H, W, 3] into 40x40 patches [P, 40, 40, 3] in row-major grid order.

  Returns the patches and their grid (row, column) positions int16 [P, 2].
  """
  h, w = frame.shape[:2]
  if frame.ndim != 3 or frame.shape[2] != 3 or h % PATCH or w % PATCH:
    raise ValueError(f"frame is {list(frame.shape)}; height and width must be multiples of {PATCH}, with 3 channels")
  rows, cols = h // PATCH, w // PATCH
  patches = frame.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(-1, PATCH, PATCH, 3)
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return np.ascontiguousarray(patches), np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int16)


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
  """RGB uint8 [H, W, 3] (H, W even) to planar YUV 4:2:0, BT.601 limited range, as [H * 3 / 2, W] uint8.

  Chroma is the mean of each 2x2 block. This is the layout `av.VideoFrame.from_ndarray(..., "yuv420p")` takes.
  """
  h, w = image.shape[:2]
  rgb = image.astype(np.float64)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
  cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
  cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
  half = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
  planes = [y.ravel(), half(cb).ravel(), half(cr).ravel()]
  return np.clip(np.round(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def render_mp4(
  path: str | os.PathLike, frames: np.ndarray, fps: float, audio: np.ndarray | None = None, *, quality: int = 18
) -> None:
  """Encodes RGB frames uint8 [T, H, W, 3] (H and W even) at `fps`, and optional 16 kHz audio float32 [C, N].

  Video is H.264 (MPEG-4 Part 2 where the bundled FFmpeg lacks an H.264 encoder), audio AAC. Colour
  conversion happens here (`rgb_to_yuv420p`) and the encoder runs on one thread, so the same frames
  give the same file on every run (frames converted by PyAV's `reformat` did not). `quality` is the
  H.264 constant rate factor (lower is closer to the input).
  """
  frames = np.asarray(frames, np.uint8)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f"frames are {list(frames.shape)}; want [T, H, W, 3] with even H and W")
  rate = fractions.Fraction(fps).limit_denominator(1001)
  with av.open(str(path), "w", format="mp4") as out:
    codec = _codec(("libx264", "h264", "mpeg4"))
    options = {"crf": str(quality), "preset": "medium"} if "264" in codec else {}
    video = out.add_stream(codec, rate=rate, options=options)
    video.width, video.height = frames.shape[2], frames.shape[1]
    video.pix_fmt = "yuv420p"
    video.codec_context.thread_count = 1
    sound = None
    if audio is not None:
      audio = np.asarray(audio, np.float32)
      if audio.ndim != 2 or audio.shape[0] not in _LAYOUTS:
        raise ValueError(f"audio is {list(audio.shape)}; want [C, N] with C = 1 or 2")
      sound = out.add_stream("aac", rate=SAMPLE_RATE, layout=_LAYOUTS[audio.shape[0]])
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")
      frame.pts = i
      frame.time_base = 1 / rate
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
    if sound is not None:
      block = sound.codec_context.frame_size or 1024
      for s in range(0, audio.shape[1], block):
        chunk = np.ascontiguousarray(audio[:, s : s + block])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_LAYOUTS[audio.shape[0]])
        frame.sample_rate = SAMPLE_RATE
        frame.pts = s
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        out.mux(sound.encode(frame))
      out.mux(sound.encode(None))
