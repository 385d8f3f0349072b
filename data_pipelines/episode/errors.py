"""Bad input data: `DataError`, and the reasons it is raised for (`SKIP_REASONS`)."""

from __future__ import annotations

# Why an input was rejected: the keys of the per-reason skip counters of builders and pipelines.
SKIP_REASONS = (
  "schema",  # not a tmlx episode, or a malformed header or manifest
  "corrupt",  # unreadable ArrayRecord shard or chunk
  "audio",  # unreadable audio file, or the wrong number of channels
  "missing",  # half of a user/model pair of files is missing
  "empty",  # a document or recording with nothing in it
  "sample_rate",
  "length",  # audio lengths disagree with each other or with the duration
  "non_finite",  # NaN/Inf audio samples
  "audio_range",  # float audio outside [-1, 1]
  "timestamps",  # out of range or not monotonic
  "token_range",  # a token id >= model.vocab_size
  "frame_size",  # video frames not of the configured size
  "transcript",  # unparseable transcript
  "video",  # undecodable video file
  "duplicate",  # two episodes with one id
  "truncated",  # a media file holding fewer samples or frames than its header promises
)


class DataError(ValueError):
  """Bad input data. `reason` (one of SKIP_REASONS) keys skip counters; the message names where and what."""

  def __init__(self, reason: str, where: str, message: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f"DataError reason {reason!r} is not one of {SKIP_REASONS}")
    super().__init__(f"{where}: {message}")
    self.reason = reason
    self.where = where
    self.detail = message

  def __reduce__(self):  # pickled with its three parts (a build's workers send errors back)
    return DataError, (self.reason, self.where, self.detail)
