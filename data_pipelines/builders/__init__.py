"""The builders of `python -m data_pipelines.build`, one per kind of input, and what they share.

    audio      stereo or paired WAV/FLAC recordings (their items and episodes), and the reading of audio
    video      MP4 videos with an audio track
    text       .txt documents and .jsonl chats
    inputs     the files INPUT arguments name, `Item` (what one episode is built from), and the
               transcript beside each media file
    policy     `on_error` (skip and count, or raise) and the counting of warnings
    builder    `Builder`: a kind with its options, as list-the-items then build-each-item; and
               `build_audio_episodes`, `build_video_episodes`, `build_text_episodes`

Each `build_*_episodes` returns (episodes, skips) in memory (small builds, tests);
`data_pipelines.build` streams a `Builder`'s episodes into shards (`data_pipelines.shards`).
"""

from data_pipelines.builders.audio import AUDIO_SUFFIXES, to_int16
from data_pipelines.builders.builder import (
  KINDS,
  OPTIONS,
  Builder,
  build_audio_episodes,
  build_text_episodes,
  build_video_episodes,
)
from data_pipelines.builders.inputs import Item, expand_inputs, find_transcript
from data_pipelines.builders.policy import ON_ERROR, WARNINGS
from data_pipelines.builders.text import TEXT_SUFFIXES
from data_pipelines.builders.video import VIDEO_SUFFIXES

__all__ = [
  "AUDIO_SUFFIXES",
  "KINDS",
  "OPTIONS",
  "Builder",
  "Item",
  "ON_ERROR",
  "TEXT_SUFFIXES",
  "VIDEO_SUFFIXES",
  "WARNINGS",
  "build_audio_episodes",
  "build_text_episodes",
  "build_video_episodes",
  "expand_inputs",
  "find_transcript",
  "to_int16",
]
