"""Background workers: the slower model a session delegates to (MODEL_SPEC.md §3).

When the model writes a `<bg_call> ... </bg_call>` span, the session hands its text and the
conversation so far to a worker's `submit`; the worker answers asynchronously, and every
micro-turn the session `poll`s for finished answers and appends each as a `<bg_result>` span to
that micro-turn's input block, so the model hears it in the window in which it arrives.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable

from tmlx.stream.config import StreamConfig


class BackgroundWorker(abc.ABC):
  """Answers `<bg_call>` requests off the session's thread."""

  @abc.abstractmethod
  def submit(self, call: str, context: str) -> None:
    """Starts answering `call` (the span's text) given `context` (the conversation so far)."""

  @abc.abstractmethod
  def poll(self) -> list[str]:
    """The answers finished since the last poll, oldest first (called once per micro-turn)."""

  @abc.abstractmethod
  def close(self) -> None:
    """Waits for answers still being computed; later polls return nothing new."""


class ThreadedWorker(BackgroundWorker):
  """Runs `answer(call, context) -> str` in a thread per request; answers are queued as they finish."""

  def __init__(self, answer: Callable[[str, str], str]):
    self._answer = answer
    self._done: queue.Queue[str] = queue.Queue()
    self._threads: list[threading.Thread] = []

  def submit(self, call: str, context: str) -> None:
    thread = threading.Thread(target=lambda: self._done.put(self._answer(call, context)), daemon=True)
    thread.start()
    self._threads.append(thread)

  def poll(self) -> list[str]:
    out = []
    while True:
      try:
        out.append(self._done.get_nowait())
      except queue.Empty:
        return out

  def close(self) -> None:
    for thread in self._threads:
      thread.join()


class ScriptedWorker(BackgroundWorker):
  """A deterministic worker for tests and demos: answers a call with `replies[call]` (or
  `default`) exactly `delay` micro-turns (polls) after it was submitted."""

  def __init__(self, replies: dict[str, str] | None = None, *, delay: int = 2, default: str = "done"):
    self.replies = dict(replies or {})
    self.delay = delay
    self.default = default
    self.calls: list[tuple[int, str, str]] = []  # (poll count at submission, call, context)
    self._polls = 0
    self._pending: list[tuple[int, str]] = []

  def submit(self, call: str, context: str) -> None:
    self.calls.append((self._polls, call, context))
    self._pending.append((self._polls + self.delay, self.replies.get(call, self.default)))

  def close(self) -> None:
    self._pending.clear()

  def poll(self) -> list[str]:
    self._polls += 1
    ready = [answer for due, answer in self._pending if due <= self._polls]
    self._pending = [(due, answer) for due, answer in self._pending if due > self._polls]
    return ready


class LanguageModelWorker(ThreadedWorker):
  """Answers with a tmlx text-only model (e.g. `experiments/background_lm.py`, trained by the same
  trainer): the call and its context go in as typed text, and the model's text out of up to
  `max_micro_turns` text-only micro-turns is the answer."""

  def __init__(self, model, stream: StreamConfig, *, max_micro_turns: int = 4, context_chars: int = 400):
    from tmlx.stream.session import Session

    self._session = Session(model, stream)
    self._lock = threading.Lock()  # one answer at a time: the session holds one KV cache
    self.max_micro_turns = max_micro_turns
    self.context_chars = context_chars
    super().__init__(self._generate)

  def _generate(self, call: str, context: str) -> str:
    with self._lock:
      session = self._session
      session.reset()
      prompt = f"{context[-self.context_chars :]}\n{call}" if context else call
      said = []
      for turn in range(self.max_micro_turns):
        block = session.input_block(None, typed_text=prompt if turn == 0 else None)
        out = session.run_block(block)
        said.append(out.text)
        if len(out.text_ids) < session.stream.k_max_text:  # it said <eot> before running out of room: done
          break
      return "".join(said).strip()
