"""Audio-visual episodes: MP4 (also .m4v, .mov) videos with an audio track, each with a transcript beside it.

Stereo audio is the user and the model; mono is the user, with a silent model. Frames are sampled at
`fps` and resized to `width` x `height` (multiples of 40) by `data_pipelines.video.decode_mp4`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

import numpy as np

from data_pipelines import video
from data_pipelines.builders.audio import check_finite, to_int16, warn_clipping
from data_pipelines.builders.inputs import Item, expand_inputs, transcript_fields
from data_pipelines.builders.policy import Warn
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import Episode, validate

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")


def video_items(inputs: Iterable[str | os.PathLike]) -> list[Item]:
  """One item per video file, in input order."""
  return [
    Item(id=p.stem, where=str(p), files=(str(p),), stem=str(p.with_suffix("")))
    for p in expand_inputs(inputs, VIDEO_SUFFIXES)
  ]


def check_video_options(fps: float, width: int, height: int) -> None:
  if width <= 0 or height <= 0 or width % video.PATCH or height % video.PATCH:
    raise ValueError(f"frame size {width}x{height}: width and height must be positive multiples of {video.PATCH}")
  if not fps > 0:
    raise ValueError(f"fps is {fps}; it must be positive")


def video_episode(
  item: Item,
  warn: Warn,
  fps: float,
  width: int,
  height: int,
  swap_channels: bool,
  allow_truncated: bool,
  options: dict,
) -> Episode:
  """The episode of one video item (`video_items`), validated; DataError when it cannot be built."""
  path = pathlib.Path(item.files[0])
  where = item.where
  frames, times, audio = video.decode_mp4(
    path, fps=fps, width=width, height=height, allow_truncated=allow_truncated, warn=warn
  )
  check_finite(audio, where, time_axis=1)
  warn_clipping(audio.T, where, warn)
  if swap_channels and len(audio) == 2:
    audio = audio[::-1]
  user = audio[0]
  model = audio[1] if len(audio) == 2 else np.zeros_like(user)
  duration = len(user) / SAMPLE_RATE
  keep = times < duration
  fields, transcript = transcript_fields(pathlib.Path(item.stem), options)
  ep = Episode(
    id=item.id,
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
