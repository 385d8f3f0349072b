"""What speaks for the model in the duplex evaluation (`tmlx.eval.duplex`): agents (a streaming
session, the reference replayed, silence), the recorded worker that answers background calls, and
the conversation run in simulated real time, or teacher-forced for the mel error.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from data_pipelines.contract import FRAMES_PER_MICRO_TURN, MICRO_TURN_SECONDS, NUM_MELS
from tmlx.eval.conversations import Conversation, Heard, Transcript, window_of

CALL_MATCH_S = 4.0  # a model's call is matched to the recorded call nearest in time within this


@dataclasses.dataclass
class Said:
  text: str
  mel: np.ndarray  # [16, 80]
  calls: list[str]


class Agent(Protocol):
  """Speaks for the model in a conversation, one micro-turn at a time."""

  def reset(self, conversation: Conversation) -> None: ...

  def step(self, t: int, heard: Heard, bg_results: list[str]) -> Said: ...


class SessionAgent:
  """A streaming session: the model under evaluation."""

  def __init__(self, session):
    self.session = session
    self.seed = 0

  def reset(self, conversation: Conversation) -> None:
    self.session.reset(self.seed)

  def step(self, t: int, heard: Heard, bg_results: list[str]) -> Said:
    out = self.session.step(heard.audio, frame=heard.frame, typed_text=heard.typed_text, bg_results=bg_results)
    return Said(out.text, out.mel, out.bg_calls)


class ReplayAgent:
  """Says exactly what the reference said (for checking the scorer: it scores as the reference)."""

  def reset(self, conversation: Conversation) -> None:
    self.conversation = conversation

  def step(self, t: int, heard: Heard, bg_results: list[str]) -> Said:
    ref = self.conversation.reference
    calls = [c for u, c in ref.calls if u == t]
    return Said(ref.texts[t], ref.mel[FRAMES_PER_MICRO_TURN * t : FRAMES_PER_MICRO_TURN * (t + 1)], calls)


class SilentAgent:
  """Never says anything (a floor for the scores)."""

  def reset(self, conversation: Conversation) -> None:
    pass

  def step(self, t: int, heard: Heard, bg_results: list[str]) -> Said:
    return Said("", np.full((FRAMES_PER_MICRO_TURN, NUM_MELS), -0.82, np.float32), [])


class RecordedWorker:
  """Answers the model's background calls with the conversation's recorded results (module docstring).

  Delays are measured from where the reference's call span ends (the micro-turn whose O block closes it;
  a span longer than K_max spans several), so a replay of the reference hears each result in the
  micro-turn the recording has it in."""

  def __init__(self, conversation: Conversation):
    ends = [t for t, _ in conversation.reference.calls]
    self.recorded = [(t + 1, window_of(rt), r) for t, (rt, r) in zip(ends, conversation.results)]
    self.pending: list[tuple[int, str]] = []  # (micro-turn whose I block hears it, text)

  def submit(self, t: int) -> None:
    """The model completed a call in O_t (played in window t+1)."""
    if not self.recorded:
      return
    played, heard, result = min(self.recorded, key=lambda r: abs(r[0] - (t + 1)))
    if abs(played - (t + 1)) * MICRO_TURN_SECONDS <= CALL_MATCH_S:
      self.pending.append((t + 1 + max(heard - played, 0), result))

  def poll(self, t: int) -> list[str]:
    ready = [r for due, r in self.pending if due <= t]
    self.pending = [(due, r) for due, r in self.pending if due > t]
    return ready


def run_live(agent: Agent, conversation: Conversation) -> Transcript:
  """The conversation in simulated real time, with `agent` speaking for the model."""
  agent.reset(conversation)
  worker = RecordedWorker(conversation)
  texts, mels, calls, results = [], [], [], []
  for t, heard in enumerate(conversation.heard):
    arrived = worker.poll(t)
    results += [(t, r) for r in arrived]
    said = agent.step(t, heard, arrived)
    texts.append(said.text)
    mels.append(np.asarray(said.mel, np.float32).reshape(FRAMES_PER_MICRO_TURN, NUM_MELS))
    for call in said.calls:
      calls.append((t, call))
      worker.submit(t)
  return Transcript(texts, np.concatenate(mels) if mels else np.zeros((0, NUM_MELS), np.float32), calls, results)


def teacher_forced_mel(session, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
  """(sampled, reference) normalized mel [16 · n, 80] of every AUDIO_OUT position, with the reference's
  text and audio fed back and its background results at their recorded times."""
  session.reset(0)
  sampled = []
  for heard, mt in zip(conversation.heard, conversation.micro_turns):
    out = session.step(
      heard.audio,
      frame=heard.frame,
      typed_text=heard.typed_text,
      bg_results=heard.bg_results,
      forced_text=mt.said_text,
      forced_audio=mt.said_dmel,
    )
    sampled.append(out.mel)
  return np.concatenate(sampled), conversation.reference.mel


def make_session(model, config, seed: int = 0):
  from tmlx.stream import Session, StreamConfig

  return Session(model, StreamConfig.from_config(config), seed=seed)
