"""`generate`: the whole sample corpus, from raw inputs to the built datasets."""

from __future__ import annotations

import pathlib
import tempfile

from data_pipelines import build
from data_pipelines.contract import MICRO_TURN_SECONDS
from data_pipelines.sample_corpus.raw import write_conversations, write_texts, write_videos
from data_pipelines.sample_corpus.speech import Voices
from tmlx import paths


def generate(
  out: str | pathlib.Path,
  *,
  seed: int = 0,
  conversations: int = 12,
  videos: int = 3,
  texts: int = 10,
  heldout: int = 4,
  seconds: float = 10.0,
  frame_size: int = 80,
  raw: str | pathlib.Path | None = None,
) -> dict[str, str]:
  """Writes raw inputs, then builds DIR/conversations, DIR/video and DIR/text, and the held-out
  DIR/heldout/conversations (and DIR/heldout/video, one video, when there are videos) from random
  streams of their own; returns their summaries. DIR may be a gs:// URL (built locally, then copied)."""
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(raw) if raw else pathlib.Path(tmp)
    names = ["conversations", "video", "text"]
    if heldout > 0:
      names += ["heldout/conversations"] + (["heldout/video"] if videos > 0 else [])
    dirs = {name: root / name for name in names}
    for d in dirs.values():
      d.mkdir(parents=True, exist_ok=True)
    voices = Voices(pathlib.Path(tmp))
    write_conversations(dirs["conversations"], voices, seed, 0, conversations, seconds)
    write_videos(dirs["video"], voices, seed, 1, videos, seconds, frame_size)
    write_texts(dirs["text"], seed, texts)
    if heldout > 0:
      write_conversations(dirs["heldout/conversations"], voices, seed, 4, heldout, seconds)
      if videos > 0:
        write_videos(dirs["heldout/video"], voices, seed, 5, 1, seconds, frame_size)

    fps = 1 / MICRO_TURN_SECONDS
    built = {}
    for name, d in dirs.items():
      if name.endswith("video"):
        built[name] = build.build_video_episodes([d], fps=fps, width=frame_size, height=frame_size, on_error="raise")
      elif name.endswith("conversations"):
        built[name] = build.build_audio_episodes([d], on_error="raise")
      else:
        built[name] = build.build_text_episodes([d], on_error="raise")
  summaries = {}
  for name, (episodes, skips) in built.items():
    written = build.write_episodes(episodes, paths.join(out, name)) if episodes else 0
    summaries[name] = build.summary(written, skips)
  return summaries
