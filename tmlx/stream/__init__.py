"""Streaming inference: a `Session` that listens and speaks every 200 ms (MODEL_SPEC.md §9)."""

from tmlx.stream.background import BackgroundWorker, LanguageModelWorker, ScriptedWorker, ThreadedWorker
from tmlx.stream.config import Sampling, StreamConfig
from tmlx.stream.session import FedPositions, InputBlock, Session, SessionFull, StepOutput

__all__ = [
  "BackgroundWorker",
  "FedPositions",
  "InputBlock",
  "LanguageModelWorker",
  "Sampling",
  "ScriptedWorker",
  "Session",
  "SessionFull",
  "StepOutput",
  "StreamConfig",
  "ThreadedWorker",
]
