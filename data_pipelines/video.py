"""Video frames: MP4 decoding to fixed-rate RGB frames with 16 kHz audio, 40x40 patches, and MP4 rendering.

All times are seconds on the container's clock (pts 0 is time 0), so decoded frames and audio stay
aligned however the file's streams were encoded.
"""

from __future__ import annotations

import fractions
import os

import av
import numpy as np

from data_pipelines.contract import PATCH_SIZE as PATCH
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import DataError

_LAYOUTS = {1: "mono", 2: "stereo"}


def _codec(candidates: tuple[str, ...]) -> str:
  for name in candidates:
    try:
      av.codec.Codec(name, "w")
      return name
    except Exception:  # PyAV raises UnknownCodecError, or ValueError in older releases
      continue
  raise RuntimeError(f"the bundled FFmpeg has none of the encoders {candidates}")


def decode_mp4(
  path: str | os.PathLike, *, fps: float, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Decodes a video file into frames at `fps`, resized to `width` x `height`, and its audio at 16 kHz.

  Frame k shows time k/fps (k = 0, 1, ... while k/fps is before the end of the video stream): it is
  the latest decoded frame whose presentation time is at or before k/fps (the first frame for
  times before it), so the file's frame rate need not match `fps`. The audio track keeps its
  channels (mono or stereo) and is placed on the same clock: a late start is padded with silence,
  samples before time 0 are dropped.

  Returns (frames uint8 [T, height, width, 3], frame_times float64 [T], audio float32 [C, N]).
  Raises DataError (reason "video") for unreadable files, a missing video or audio track, or more
  than two audio channels.
  """
  where = str(path)
  if not fps > 0 or width <= 0 or height <= 0:
    raise ValueError(f"fps {fps}, width {width} and height {height} must be positive")
  try:
    container = av.open(where)
  except (av.FFmpegError, OSError) as e:
    raise DataError("video", where, f"cannot open: {e}") from None
  with container:
    if not container.streams.video:
      raise DataError("video", where, "no video track")
    if not container.streams.audio:
      raise DataError("video", where, "no audio track")
    vstream, astream = container.streams.video[0], container.streams.audio[0]
    vstream.thread_type = "AUTO"
    frames = _FrameSampler(fps, width, height, vstream)
    audio = _AudioCollector(astream, where)
    try:
      for packet in container.demux(vstream, astream):
        for frame in packet.decode():
          (frames if packet.stream is vstream else audio).add(frame)
    except av.FFmpegError as e:
      raise DataError("video", where, f"cannot decode: {e}") from None
    frames.finish()
  if not frames.frames:
    raise DataError("video", where, "the video track has no frames")
  return np.stack(frames.frames), np.asarray(frames.times, np.float64), audio.finish()


class _FrameSampler:
  """Keeps, for each target time k/fps, the latest frame presented at or before it."""

  def __init__(self, fps: float, width: int, height: int, stream):
    self.fps, self.width, self.height = fps, width, height
    self.step = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps
    self.frames: list[np.ndarray] = []
    self.times: list[float] = []
    self.current, self.rgb, self.end = None, None, 0.0

  def _emit_until(self, limit: float) -> None:
    while len(self.times) / self.fps < limit - 1e-9:
      if self.rgb is None:
        self.rgb = self.current.reformat(width=self.width, height=self.height, format="rgb24").to_ndarray()
      self.frames.append(self.rgb)
      self.times.append(len(self.times) / self.fps)

  def add(self, frame) -> None:
    if frame.time is None:
      return
    t = float(frame.time)
    if self.current is not None:
      self._emit_until(t)  # the first frame also covers targets before it
    self.current, self.rgb = frame, None
    self.end = max(self.end, t + (float(frame.duration * frame.time_base) if frame.duration else self.step))

  def finish(self) -> None:
    if self.current is not None:
      self._emit_until(self.end)


class _AudioCollector:
  """Resamples decoded audio to 16 kHz float32 [C, N] so that sample 0 is time 0, cut at the track's end."""

  def __init__(self, stream, where: str):
    self.channels = stream.codec_context.channels
    if self.channels not in _LAYOUTS:
      raise DataError("video", where, f"the audio track has {self.channels} channels; want mono or stereo")
    self.resampler = av.AudioResampler(format="fltp", layout=_LAYOUTS[self.channels], rate=SAMPLE_RATE)
    self.chunks: list[np.ndarray] = []
    self.start: float | None = None
    self.end = float(((stream.start_time or 0) + stream.duration) * stream.time_base) if stream.duration else None

  def add(self, frame) -> None:
    if self.start is None and frame.time is not None:
      self.start = float(frame.time)
    self.chunks.extend(out.to_ndarray() for out in self.resampler.resample(frame))

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
