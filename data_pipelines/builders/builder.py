"""`Builder`: one kind of input (audio, video or text) with its options, as the two steps a build
runs: list the items (`items`), then build each one into a validated episode (`make`), anywhere.

A builder is plain data (its kind and its options), so it pickles to the workers of a distributed
build, and `fingerprint` says what its episodes depend on besides the inputs themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable

from data_pipelines.builders import audio, text, video
from data_pipelines.builders.inputs import Item, local_copy, transcript_options
from data_pipelines.builders.policy import Policy, Warn, build_each
from data_pipelines.episode import Episode

_MEDIA = {
  "swap_channels": False,
  "allow_truncated": False,
  "user_tier": "user",
  "model_tier": "model",
  "ctm_channels": None,
}
# Each kind's options and their defaults: the keyword arguments of its `build_*_episodes`.
OPTIONS = {
  "audio": _MEDIA,
  "video": {**_MEDIA, "fps": 5.0, "width": 320, "height": 240},
  "text": {"words_per_second": 10.0},
}
KINDS = tuple(OPTIONS)


@dataclasses.dataclass(frozen=True)
class Builder:
  """Builds episodes of `kind` with `options` (missing ones take their defaults, `OPTIONS`)."""

  kind: str
  options: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in OPTIONS:
      raise ValueError(f"kind is {self.kind!r}; want one of {KINDS}")
    unknown = sorted(set(self.options) - set(OPTIONS[self.kind]))
    if unknown:
      raise TypeError(f"{self.kind} builds take no option {', '.join(map(repr, unknown))}")
    options = {**OPTIONS[self.kind], **self.options}
    if self.kind == "video":
      video.check_video_options(options["fps"], options["width"], options["height"])
    elif self.kind == "text":
      text.check_text_options(options["words_per_second"])
    object.__setattr__(self, "options", options)

  def items(self, inputs: Iterable[str | os.PathLike]) -> list[Item]:
    """The items of `inputs` (files, directories, glob patterns, local or URLs), in input order."""
    return {"audio": audio.audio_items, "video": video.video_items, "text": text.text_items}[self.kind](inputs)

  def make(self, item: Item, warn: Warn) -> Episode:
    """The validated episode of `item` (media and their transcripts copied here first when they
    are remote); raises DataError naming the input when it cannot be built."""
    o = self.options
    if self.kind == "text":  # read where it is: a .jsonl line is a byte range of its file
      return text.text_episode(item, warn, o["words_per_second"])
    with local_copy(item) as local:
      transcripts = transcript_options(o["user_tier"], o["model_tier"], o["ctm_channels"])
      if self.kind == "audio":
        return audio.audio_episode(local, warn, o["swap_channels"], o["allow_truncated"], transcripts)
      return video.video_episode(
        local, warn, o["fps"], o["width"], o["height"], o["swap_channels"], o["allow_truncated"], transcripts
      )

  def each(self, items: Iterable[Item], policy: Policy) -> Iterable[Episode]:
    """The episodes of `items`, one at a time (`build_each`: skips and warnings go to `policy`)."""
    return build_each(items, self.make, policy)

  def collect(self, inputs: Iterable[str | os.PathLike], policy: Policy) -> tuple[list[Episode], collections.Counter]:
    """All the episodes of `inputs` in a list, and the skips by reason (for small builds and tests)."""
    return list(self.each(self.items(inputs), policy)), policy.skips

  def fingerprint(self) -> str:
    """The kind and options, as canonical JSON."""
    return json.dumps({"kind": self.kind, "options": self.options}, sort_keys=True)


def build_audio_episodes(
  inputs: Iterable[str | os.PathLike], *, on_error: str = "skip", warnings: collections.Counter | None = None, **options
) -> tuple[list[Episode], collections.Counter]:
  """Audio episodes from stereo or paired WAV/FLAC recordings with transcripts; returns (episodes,
  skips). `options`: the audio options of `OPTIONS`. Truncated files are skipped unless
  `allow_truncated`; the warnings of written episodes are counted into `warnings` when it is given."""
  return Builder("audio", options).collect(inputs, Policy(on_error, warnings))


def build_video_episodes(
  inputs: Iterable[str | os.PathLike], *, on_error: str = "skip", warnings: collections.Counter | None = None, **options
) -> tuple[list[Episode], collections.Counter]:
  """Audio-visual episodes from video files with transcripts; returns (episodes, skips).
  `options`: the video options of `OPTIONS`; warnings as `build_audio_episodes`."""
  return Builder("video", options).collect(inputs, Policy(on_error, warnings))


def build_text_episodes(
  inputs: Iterable[str | os.PathLike], *, on_error: str = "skip", words_per_second: float = 10.0
) -> tuple[list[Episode], collections.Counter]:
  """Text-only episodes from .txt and .jsonl documents; returns (episodes, skips)."""
  return Builder("text", {"words_per_second": words_per_second}).collect(inputs, Policy(on_error))
