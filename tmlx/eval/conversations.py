"""The held-out conversations of the duplex evaluation (`tmlx.eval.duplex`): what the session hears
in each micro-turn, and the reference's timeline that scoring compares it with.

A conversation is an episode with audio of an episode dataset, aligned with a run's data settings
and laid out by the training rows' writer (`data_pipelines.microturn`), so that the session hears
what training rows hold. `Transcript` is what one speaker (the model, or the reference replayed)
did in each micro-turn.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS

_NOT_WORD = re.compile(r"[^a-z0-9'\-]")


def normalize_word(text: str) -> str:
  return _NOT_WORD.sub("", text.lower()).strip("-'")


@dataclasses.dataclass
class Heard:
  """What the session hears in micro-turn t of a recorded conversation."""

  audio: np.ndarray  # [SAMPLES_PER_MICRO_TURN] the user channel's window t
  frame: np.ndarray | None  # [H, W, 3] uint8
  typed_text: list[str]
  bg_results: list[str]  # the recorded results arriving in window t (teacher forcing only)


@dataclasses.dataclass
class Conversation:
  """A held-out conversation: its micro-turns and the reference timeline scoring needs."""

  id: str
  duration: float
  heard: list[Heard]
  micro_turns: list  # data_pipelines.microturn.MicroTurn: the reference's outputs (said_text, said_mel, said_dmel)
  user_words: list[tuple[float, float, str]]  # (start, end, normalized), spoken
  typed: list[tuple[float, str]]
  calls: list[tuple[float, str]]  # recorded (time, text)
  results: list[tuple[float, str]]
  reference: Transcript

  @property
  def windows(self) -> int:
    return len(self.heard)


@dataclasses.dataclass
class Transcript:
  """What a speaker (the model, or the reference replayed) did in each micro-turn."""

  texts: list[str]  # decoded O_t text, specials as their names
  mel: np.ndarray  # [16 · n, 80] normalized log-mel of windows 1..n
  calls: list[tuple[int, str]]  # (micro-turn whose O block completed the call, its text)
  results: list[tuple[int, str]]  # (micro-turn whose I block heard the result, its text)


def window_of(time_s: float) -> int:
  return int(math.floor(time_s / MICRO_TURN_SECONDS + 1e-6))


def load_conversations(
  dirs: Sequence[str], config, *, limit: int | None = None, tokenizer=None
) -> tuple[list[Conversation], dict[str, int]]:
  """The conversations (episodes with audio) of the episode datasets `dirs`, aligned with `config`'s data
  settings and laid out by the training rows' writer; returns them and the count of episodes left out."""
  from data_pipelines.align import AlignSpec, align
  from data_pipelines.contract import SAMPLES_PER_MICRO_TURN, special_id
  from data_pipelines.episode import EpisodeReader
  from data_pipelines.microturn import episode_micro_turns
  from data_pipelines.tokenizer import make_tokenizer

  tokenizer = tokenizer or make_tokenizer(config.data.tokenizer)
  d = config.data
  spec = AlignSpec(d.k_max, d.text_only_k_max, d.frame_height, d.frame_width, config.model.vocab_size)
  eot = special_id("<eot>")
  out, text_only = [], 0
  for directory in dirs:
    reader = EpisodeReader(directory)
    for i, info in enumerate(reader.episodes):
      if limit is not None and len(out) >= limit:
        return out, {"text_only": text_only}
      if not info.has_audio:
        text_only += 1
        continue
      ep = reader.read(i)
      layout = align(ep, tokenizer, spec, f"{directory} episode {ep.id!r}")
      turns = episode_micro_turns(ep, layout, causal=d.audio_causal)
      n = SAMPLES_PER_MICRO_TURN
      heard = [
        Heard(
          audio=ep.user_audio[t * n : (t + 1) * n],
          frame=mt.frame,
          typed_text=[tokenizer.decode(ids) for ids in mt.typed_text],
          bg_results=[tokenizer.decode(ids) for ids in mt.bg_results],
        )
        for t, mt in enumerate(turns)
      ]
      texts = [tokenizer.decode([x for x in mt.said_text if x != eot]) for mt in turns]
      reference = Transcript(
        texts=texts,
        mel=np.concatenate([mt.said_mel for mt in turns]).astype(np.float32),
        calls=completed_calls(texts),
        results=[(t, r) for t, h in enumerate(heard) for r in h.bg_results],
      )
      out.append(
        Conversation(
          id=ep.id,
          duration=ep.duration,
          heard=heard,
          micro_turns=turns,
          user_words=[(w.start, w.end, normalize_word(w.text)) for w in ep.user_words if normalize_word(w.text)],
          typed=[(e.time, e.text) for e in ep.typed_text],
          calls=[(e.time, e.text) for e in ep.bg_calls],
          results=[(e.time, e.text) for e in ep.bg_results],
          reference=reference,
        )
      )
  return out, {"text_only": text_only}


def joined_with_times(texts: Sequence[str]) -> tuple[str, list[int]]:
  """The stream's texts joined, and the micro-turn of each character."""
  return "".join(texts), [t for t, text in enumerate(texts) for _ in text]


def completed_calls(texts: Sequence[str]) -> list[tuple[int, str]]:
  """(micro-turn, text) of each `<bg_call> ... </bg_call>` span, at the micro-turn that closes it."""
  joined, times = joined_with_times(texts)
  return [(times[m.end() - 1], m.group(1)) for m in re.finditer(r"<bg_call>(.*?)</bg_call>", joined, re.S)]
