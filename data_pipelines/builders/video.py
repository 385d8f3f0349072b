"""Audio-visual episodes: MP4 (also .m4v, .mov) videos with an audio track, each with a transcript beside it.

Stereo audio is the user and the model; mono is the user, with a silent model. Frames are sampled at
`fps` and resized to `width` x `height` (multiples of 40) by `data_pipelines.video.decode_mp4`.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from data_pipelines import video
from data_pipelines.builders.audio import check_finite, to_int16, warn_clipping
from data_pipelines.builders.inputs import expand_inputs, transcript_fields, transcript_options
from data_pipelines.builders.policy import Policy, Warn, collect
from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import Episode, validate

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")


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
  check_finite(audio, where, time_axis=1)
  warn_clipping(audio.T, where, warn)
  if swap_channels and len(audio) == 2:
    audio = audio[::-1]
  user = audio[0]
  model = audio[1] if len(audio) == 2 else np.zeros_like(user)
  duration = len(user) / SAMPLE_RATE
  keep = times < duration
  fields, transcript = transcript_fields(path.with_suffix(""), options)
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
  policy = Policy(on_error, warnings)
  options = transcript_options(user_tier, model_tier, ctm_channels)
  items = [(p.stem, str(p), p) for p in expand_inputs(inputs, VIDEO_SUFFIXES)]
  make = lambda warn, path: _video_episode(warn, path, fps, width, height, swap_channels, allow_truncated, options)
  return collect(items, make, policy), policy.skips
