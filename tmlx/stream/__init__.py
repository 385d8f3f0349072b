"""Streaming inference: a `Session` that listens and speaks every 200 ms (MODEL_SPEC.md §9)."""

from tmlx.stream.session import InputBlock, Sampling, Session, SessionFull, StepOutput

__all__ = ["InputBlock", "Sampling", "Session", "SessionFull", "StepOutput"]
