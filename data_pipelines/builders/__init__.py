"""The builders of `python -m data_pipelines.build`, one per kind of input, and what they share.

    audio      `build_audio_episodes`: stereo or paired WAV/FLAC recordings, and the reading of audio
    video      `build_video_episodes`: MP4 videos with an audio track
    text       `build_text_episodes`: .txt documents and .jsonl chats
    inputs     the files INPUT arguments name, and the transcript beside each media file
    policy     `on_error` (skip and count, or raise) and the counting of warnings

Each builder returns (episodes, skips); `data_pipelines.build` writes them.
"""

from data_pipelines.builders.audio import AUDIO_SUFFIXES, build_audio_episodes, to_int16
from data_pipelines.builders.inputs import expand_inputs, find_transcript
from data_pipelines.builders.policy import ON_ERROR, WARNINGS
from data_pipelines.builders.text import TEXT_SUFFIXES, build_text_episodes
from data_pipelines.builders.video import VIDEO_SUFFIXES, build_video_episodes

__all__ = [
  "AUDIO_SUFFIXES",
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
