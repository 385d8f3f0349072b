"""Streaming inference: a `Session` that listens and speaks every 200 ms (MODEL_SPEC.md §9).

Names load on first use: `tmlx.stream.config` (StreamConfig, Sampling), which config validation
reads, needs none of the session's programs.
"""

from tmlx import lazy

__getattr__, __all__ = lazy.exports(
  __name__,
  {
    "BackgroundWorker": "tmlx.stream.background",
    "FedPositions": "tmlx.stream.session",
    "InputBlock": "tmlx.stream.session",
    "LanguageModelWorker": "tmlx.stream.background",
    "Sampling": "tmlx.stream.config",
    "ScriptedWorker": "tmlx.stream.background",
    "Session": "tmlx.stream.session",
    "SessionFull": "tmlx.stream.session",
    "StepOutput": "tmlx.stream.session",
    "StreamConfig": "tmlx.stream.config",
    "ThreadedWorker": "tmlx.stream.background",
  },
)
