"""Full-duplex behaviour of a checkpoint on held-out conversations.

  python -m tmlx.eval duplex --checkpoint WORKDIR --data DIR[,DIR...] [--out DIR] [--conversations N]
      [--step N] [--seed 0] [--temperature T] [--top_p P] [--audio_temperature TAU] [--audio_steps N]
      [--window W]

Each conversation with audio in the episode datasets of --data (built by `python -m data_pipelines.build`)
goes through a streaming `tmlx.stream.Session` in simulated real time. In micro-turn t the session hears
window t (200 ms) of the user channel, the video frame and typed text whose times fall in window t, and
the background results that have arrived; what it writes in O_t is played in window t+1. A recorded
worker answers the model's `<bg_call>`s: a call is matched to the conversation's recorded call nearest in
time (within `CALL_MATCH_S`), and its recorded result arrives as many windows after the model's call as it
arrived after the recorded one; a call with no recorded counterpart gets no answer, and no result arrives
unless the model calls. The user's side is the recording: it does not wait for the model.

The scores compare the session with the conversation's own word times and events (seconds):

- Words. The model's words are its text stream without `<bg_call>` spans, split at whitespace and
  wherever a micro-turn without text comes between two characters; a word's time is the start of
  the window it is played in, (t+1)·0.2 s for a word begun in O_t. The reference model's words are
  timed the same way from the alignment of its recorded words into micro-turns
  (`data_pipelines.align`), so a replay of the reference scores as the reference. Words are compared
  lower-cased without punctuation. Model voice: a frame (12.5 ms) is voiced when its mean normalized
  log-mel is above `VOICED_LEVEL`; a window is voiced when at least `VOICED_FRAMES` of its 16 frames are.
- Utterances. A speaker's consecutive words whose times are at most `UTTERANCE_GAP_S` apart form an
  utterance, which lasts from its first word's time to `WORD_S` after its last word's. An utterance is a
  backchannel when it has at most 2 words, all in `BACKCHANNELS`.
- User turns. The user's spoken words form IPUs (inter-pausal units: runs of words with gaps below
  `IPU_GAP_S`); a typed text is an IPU of no length at its time. Backchannel IPUs are left out; two
  consecutive IPUs belong to one user turn unless the reference model begins a non-backchannel utterance,
  or writes a background call, between the first one's start and the second one's. A turn expects an
  answer when the reference model does so after the turn's last IPU starts. The gaps between the IPUs of a
  turn are its mid-turn pauses. A turn's response window runs from its end (its last word's end) to
  `GRACE_S` after the next turn starts (or to the end of the conversation).

Metrics (pooled over all conversations; each conversation's JSON has them per turn too):

- `takeover_rate`: of the turns that expect an answer, the fraction in whose response window the model
  says a non-backchannel word (the takeover rate of Full-Duplex-Bench);
- `response_latency_s`: for each such turn, the time of that first word minus the turn's end;
  `audio_latency_s`: the start of the model's first voiced run (`VOICED_RUN` frames) that begins in the
  response window, minus the turn's end (p50 and p90 of both are reported);
- `answer_word_accuracy`: 1 - (word edit distance / reference words) over every answer pooled, at least
  0: the model's non-backchannel words in each expecting turn's response window against the reference's;
- `false_takeover_rate`: the model's non-backchannel utterance onsets during user turns (from a turn's
  start to its end: over the user's speech or in a mid-turn pause), per user turn;
- `barge_in_yield_s`: at each user turn that starts while the model is in a non-backchannel utterance, the
  time from the turn's start to that utterance's end (p50; `barge_ins` counts them);
- `bg_call_rate`: of the turns whose reference writes a background call (from the turn's start to the
  end of its response window), the fraction where the model writes one there too; `bg_answer_rate`: the
  fraction where the model's words after its result arrived (played from the window after) contain every
  result word: the reference's words after its result arrived that the conversation had not used before;
- `voiced_agreement`: over every window of every conversation, the fraction where the model's audio and
  the reference model channel agree on voiced or silent;
- `mel_error_vs_mean`: teacher-forced (the reference's text and audio are fed back instead of the
  model's, and its background results arrive at their recorded times), the mean squared error of the mel
  that the flow head samples for each AUDIO_OUT position against the reference mel, divided by the error
  of predicting every frame as the per-channel mean of the same reference frames.

Writes into --out: `<episode id>.json` (turns, words, events, metrics) and `<episode id>.png` (reference
and model turns, background calls and results, voiced windows on one time axis) per conversation, and
`summary.json`. Prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from data_pipelines.contract import FRAMES_PER_MICRO_TURN, MICRO_TURN_SECONDS, NUM_MELS
from tmlx import paths

FRAME_S = MICRO_TURN_SECONDS / FRAMES_PER_MICRO_TURN
IPU_GAP_S = 0.25
UTTERANCE_GAP_S = 0.8
WORD_S = 0.4
GRACE_S = 0.4
CALL_MATCH_S = 4.0
VOICED_LEVEL = -0.5  # normalized log-mel; silence of a recording is about -0.82, speech about 0
VOICED_FRAMES = 4
VOICED_RUN = 3
BACKCHANNELS = frozenset({"mm-hmm", "mhm", "uh-huh", "hmm", "yeah", "yes", "okay", "ok", "right", "sure"})

_SPECIAL = re.compile(r"<bg_call>.*?(</bg_call>|$)|</?[a-z_]+>", re.S)
_NOT_WORD = re.compile(r"[^a-z0-9'\-]")


def normalize_word(text: str) -> str:
  return _NOT_WORD.sub("", text.lower()).strip("-'")


# -- the conversation and its reference ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Word:
  time: float
  text: str  # normalized


@dataclasses.dataclass(frozen=True)
class Utterance:
  start: float
  end: float
  words: tuple[str, ...]

  @property
  def backchannel(self) -> bool:
    return len(self.words) <= 2 and all(w in BACKCHANNELS for w in self.words)


@dataclasses.dataclass(frozen=True)
class Ipu:
  start: float
  end: float
  words: tuple[str, ...]
  typed: bool = False


@dataclasses.dataclass(frozen=True)
class UserTurn:
  ipus: tuple[Ipu, ...]
  expects_answer: bool
  next_start: float  # the next turn's start (inf for the last)
  window_end: float  # end of the response window

  @property
  def start(self) -> float:
    return self.ipus[0].start

  @property
  def end(self) -> float:
    return self.ipus[-1].end

  @property
  def typed(self) -> bool:
    return all(i.typed for i in self.ipus)


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
        calls=_completed_calls(texts),
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


def _timed(texts: Sequence[str]) -> tuple[str, list[int]]:
  """The stream's texts joined, and the micro-turn of each character."""
  return "".join(texts), [t for t, text in enumerate(texts) for _ in text]


def _completed_calls(texts: Sequence[str]) -> list[tuple[int, str]]:
  """(micro-turn, text) of each `<bg_call> ... </bg_call>` span, at the micro-turn that closes it."""
  joined, times = _timed(texts)
  return [(times[m.end() - 1], m.group(1)) for m in re.finditer(r"<bg_call>(.*?)</bg_call>", joined, re.S)]


# -- agents: what speaks for the model -----------------------------------------------------------


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


# -- scoring -------------------------------------------------------------------------------------


def stream_words(texts: Sequence[str]) -> list[Word]:
  """The words of a text stream (one string per micro-turn), each at the start of the window it is
  played in; `<bg_call>` spans and other specials are not words."""
  joined, times = _timed(texts)
  keep = np.ones(len(joined), bool)
  for m in _SPECIAL.finditer(joined):
    keep[m.start() : m.end()] = False
  words, current = [], []  # current: indices of the characters of the word being read
  for i in range(len(joined) + 1):
    # A word may run on into the next micro-turn (K_max), not past one in which nothing was said.
    gap = bool(current) and i < len(joined) and times[i] > times[current[-1]] + 1
    if i < len(joined) and keep[i] and not joined[i].isspace() and not gap:
      current.append(i)
      continue
    text = normalize_word("".join(joined[j] for j in current))
    if text:
      words.append(Word((times[current[0]] + 1) * MICRO_TURN_SECONDS, text))
    current = [i] if gap and keep[i] and not joined[i].isspace() else []
  return words


def utterances(words: Sequence[Word]) -> list[Utterance]:
  out, group = [], []
  for w in words:
    if group and w.time - group[-1].time > UTTERANCE_GAP_S:
      out.append(Utterance(group[0].time, group[-1].time + WORD_S, tuple(x.text for x in group)))
      group = []
    group.append(w)
  if group:
    out.append(Utterance(group[0].time, group[-1].time + WORD_S, tuple(x.text for x in group)))
  return out


def user_ipus(conversation: Conversation) -> list[Ipu]:
  """Spoken IPUs (backchannels included) and typed IPUs, by start time."""
  ipus, group = [], []
  for start, end, text in sorted(conversation.user_words):
    if group and start - group[-1][1] >= IPU_GAP_S:
      ipus.append(Ipu(group[0][0], max(g[1] for g in group), tuple(g[2] for g in group)))
      group = []
    group.append((start, end, text))
  if group:
    ipus.append(Ipu(group[0][0], max(g[1] for g in group), tuple(g[2] for g in group)))
  for t, text in conversation.typed:
    ipus.append(Ipu(t, t, tuple(w for w in map(normalize_word, text.split()) if w), typed=True))
  return sorted(ipus, key=lambda i: i.start)


def _is_backchannel(ipu: Ipu) -> bool:
  return not ipu.typed and len(ipu.words) <= 2 and all(w in BACKCHANNELS for w in ipu.words)


def user_turns(conversation: Conversation) -> list[UserTurn]:
  """The user's turns, by the reference model's responses (module docstring)."""
  ref = conversation.reference
  onsets = [u.start for u in utterances(stream_words(ref.texts)) if not u.backchannel]
  onsets += [(t + 1) * MICRO_TURN_SECONDS for t, _ in ref.calls]
  onsets.sort()
  ipus = [i for i in user_ipus(conversation) if not _is_backchannel(i)]
  responds = lambda a, b: any(a < x < b for x in onsets)
  groups: list[list[Ipu]] = []
  for ipu in ipus:
    if groups and not responds(groups[-1][-1].start, ipu.start):
      groups[-1].append(ipu)
    else:
      groups.append([ipu])
  end = conversation.windows * MICRO_TURN_SECONDS + MICRO_TURN_SECONDS
  turns = []
  for k, group in enumerate(groups):
    next_start = groups[k + 1][0].start if k + 1 < len(groups) else math.inf
    window_end = min(next_start + GRACE_S, end)
    turns.append(UserTurn(tuple(group), responds(group[-1].start, next_start), next_start, window_end))
  return turns


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i] + [0] * len(b)
    for j, y in enumerate(b, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
    prev = cur
  return prev[-1]


def voiced_frames(mel: np.ndarray) -> np.ndarray:
  """[frames] bool: frames whose mean normalized log-mel is above VOICED_LEVEL."""
  return np.asarray(mel, np.float32).mean(axis=-1) > VOICED_LEVEL


def voiced_windows(mel: np.ndarray) -> np.ndarray:
  """[windows] bool from mel [16 · windows, 80]: at least VOICED_FRAMES voiced frames in the window."""
  f = FRAMES_PER_MICRO_TURN
  frames = voiced_frames(mel)
  return frames[: len(frames) // f * f].reshape(-1, f).sum(axis=1) >= VOICED_FRAMES


def voiced_onsets(mel: np.ndarray) -> list[float]:
  """Start times of the voiced runs of at least VOICED_RUN frames (frame 0 plays at 0.2 s)."""
  frames = voiced_frames(mel)
  onsets, run = [], 0
  for i, v in enumerate(frames):
    run = run + 1 if v else 0
    if run == VOICED_RUN:
      onsets.append(MICRO_TURN_SECONDS + (i - VOICED_RUN + 1) * FRAME_S)
  return onsets


def _in(words: Sequence[Word], lo: float, hi: float, utts: Sequence[Utterance]) -> list[Word]:
  """Words in [lo, hi) that belong to non-backchannel utterances."""
  spoken = [(u.start, u.end) for u in utts if not u.backchannel]
  return [w for w in words if lo <= w.time < hi and any(a <= w.time < b for a, b in spoken)]


def score(conversation: Conversation, live: Transcript) -> dict:
  """Per-turn results and pooled counts of one conversation (module docstring)."""
  ref = conversation.reference
  ref_words, live_words = stream_words(ref.texts), stream_words(live.texts)
  ref_utts, live_utts = utterances(ref_words), utterances(live_words)
  live_onsets = voiced_onsets(live.mel)
  turns = user_turns(conversation)
  used_before = _vocabulary_before(conversation)
  detail, counts = [], _empty_counts()
  counts["user_turns"] = len(turns)
  for turn in turns:
    row = {
      "start": round(turn.start, 3),
      "end": round(turn.end, 3),
      "user": " ".join(w for i in turn.ipus for w in i.words),
      "typed": turn.typed,
      "expects_answer": turn.expects_answer,
      "pauses": [round(b.start - a.end, 3) for a, b in zip(turn.ipus, turn.ipus[1:])],
    }
    # False takeovers: the model begins an utterance while the user holds the turn.
    false = [u for u in live_utts if not u.backchannel and turn.start <= u.start < turn.end]
    row["false_takeovers"] = len(false)
    counts["false_takeovers"] += len(false)
    # Barge-in: the turn starts while the model is in an utterance.
    if not turn.typed:
      over = [u for u in live_utts if not u.backchannel and u.start < turn.start < u.end]
      if over:
        row["barge_in_yield_s"] = round(over[0].end - turn.start, 3)
        counts["barge_in_yield_s"].append(over[0].end - turn.start)
    if turn.expects_answer:
      lo, hi = turn.end, turn.window_end
      said = _in(live_words, lo, hi, live_utts)
      want = _in(ref_words, lo, hi, ref_utts)
      counts["answers"] += 1
      row["reference_answer"] = " ".join(w.text for w in want)
      row["model_answer"] = " ".join(w.text for w in said)
      if said:
        counts["takeovers"] += 1
        row["latency_s"] = round(said[0].time - lo, 3)
        counts["latency_s"].append(said[0].time - lo)
      audio = [x for x in live_onsets if lo <= x < hi]
      if audio:
        row["audio_latency_s"] = round(audio[0] - lo, 3)
        counts["audio_latency_s"].append(audio[0] - lo)
      if want:
        errors = _edit_distance([w.text for w in said], [w.text for w in want])
        row["word_accuracy"] = round(max(0.0, 1 - errors / len(want)), 4)
        counts["answer_errors"] += errors
        counts["answer_words"] += len(want)
      # Background model.
      ref_calls = [(t, c) for t, c in ref.calls if turn.start <= (t + 1) * MICRO_TURN_SECONDS < turn.next_start]
      if ref_calls:
        counts["bg_questions"] += 1
        live_calls = [(t, c) for t, c in live.calls if turn.start <= (t + 1) * MICRO_TURN_SECONDS < turn.next_start]
        row["reference_call"] = ref_calls[0][1]
        row["model_calls"] = [c for _, c in live_calls]
        counts["bg_calls"] += bool(live_calls)
        needed = _result_words(ref, ref_words, ref_utts, ref_calls[0][0], lo, hi, used_before)
        contained = False
        if needed and live_calls:
          arrived = [t for t, _ in live.results if t > live_calls[0][0]]
          if arrived:
            after = {w.text for w in _in(live_words, (arrived[0] + 1) * MICRO_TURN_SECONDS, hi, live_utts)}
            contained = needed <= after
        row["result_words"] = sorted(needed)
        row["result_said"] = contained
        counts["bg_answered"] += contained
    detail.append(row)
  live_voiced, ref_voiced = voiced_windows(live.mel), voiced_windows(ref.mel)
  n = min(len(live_voiced), len(ref_voiced))
  counts["windows"] = n
  counts["voiced_agree"] = int((live_voiced[:n] == ref_voiced[:n]).sum())
  return {"turns": detail, "counts": counts}


def _vocabulary_before(conversation: Conversation) -> Callable[[float], set[str]]:
  """time → the words the conversation used before it (both speakers, typed text, background calls)."""
  ref = conversation.reference
  timed = [(s, w) for s, _, w in conversation.user_words]
  timed += [(t, normalize_word(w)) for t, text in conversation.typed for w in text.split()]
  timed += [(w.time, w.text) for w in stream_words(ref.texts)]
  timed += [((t + 1) * MICRO_TURN_SECONDS, normalize_word(w)) for t, c in ref.calls for w in c.split()]
  return lambda at: {w for t, w in timed if t < at and w}


def _result_words(ref, ref_words, ref_utts, call_turn, lo, hi, used_before) -> set[str]:
  results = [t for t, _ in ref.results if t > call_turn]
  if not results:
    return set()
  heard = (results[0] + 1) * MICRO_TURN_SECONDS
  after = [w.text for w in _in(ref_words, max(lo, heard), hi, ref_utts)]
  new = set(after) - used_before(results[0] * MICRO_TURN_SECONDS)
  return new or set(after)


def _empty_counts() -> dict:
  return {
    "user_turns": 0,
    "answers": 0,
    "takeovers": 0,
    "latency_s": [],
    "audio_latency_s": [],
    "answer_errors": 0,
    "answer_words": 0,
    "false_takeovers": 0,
    "barge_in_yield_s": [],
    "bg_questions": 0,
    "bg_calls": 0,
    "bg_answered": 0,
    "windows": 0,
    "voiced_agree": 0,
  }


def summarize(counts: Sequence[dict], mel_errors: tuple[float, float] | None = None) -> dict:
  """Pooled metrics from per-conversation counts (and the teacher-forced (model, mean) mel errors)."""
  total = _empty_counts()
  for c in counts:
    for k, v in c.items():
      total[k] = total[k] + v
  ratio = lambda a, b: total[a] / total[b] if total[b] else float("nan")
  pct = lambda k, q: float(np.percentile(total[k], q)) if total[k] else float("nan")
  out = {
    "conversations": len(counts),
    "user_turns": total["user_turns"],
    "answers_expected": total["answers"],
    "takeover_rate": ratio("takeovers", "answers"),
    "response_latency_s_p50": pct("latency_s", 50),
    "response_latency_s_p90": pct("latency_s", 90),
    "audio_latency_s_p50": pct("audio_latency_s", 50),
    "audio_latency_s_p90": pct("audio_latency_s", 90),
    "answer_word_accuracy": max(0.0, 1 - ratio("answer_errors", "answer_words")) if total["answer_words"] else math.nan,
    "false_takeover_rate": ratio("false_takeovers", "user_turns"),
    "barge_ins": len(total["barge_in_yield_s"]),
    "barge_in_yield_s_p50": pct("barge_in_yield_s", 50),
    "bg_questions": total["bg_questions"],
    "bg_call_rate": ratio("bg_calls", "bg_questions"),
    "bg_answer_rate": ratio("bg_answered", "bg_questions"),
    "voiced_agreement": ratio("voiced_agree", "windows"),
  }
  if mel_errors is not None:
    model, mean = mel_errors
    out["mel_error"] = model
    out["mel_error_of_mean"] = mean
    out["mel_error_vs_mean"] = model / mean if mean else math.nan
  return out


# -- evaluation of a model -----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  summary: dict
  conversations: list[dict]  # per conversation: id, turns, metrics, transcript


def evaluate(agent: Agent, conversations: Sequence[Conversation], *, session=None) -> Result:
  """Runs and scores every conversation; with `session`, also the teacher-forced mel error."""
  per, counts = [], []
  sampled, reference = [], []
  for conv in conversations:
    live = run_live(agent, conv)
    scored = score(conv, live)
    entry = {
      "id": conv.id,
      "duration_s": conv.duration,
      "metrics": summarize([scored["counts"]]),
      "turns": scored["turns"],
      "model": _transcript_json(live),
      "reference": _transcript_json(conv.reference),
      "_live": live,
    }
    if session is not None:
      s, r = teacher_forced_mel(session, conv)
      sampled.append(s)
      reference.append(r)
      err = float(np.mean(np.square(s - r)))
      entry["metrics"]["mel_error"] = err
    per.append(entry)
    counts.append(scored["counts"])
  mel = None
  if sampled:
    s, r = np.concatenate(sampled), np.concatenate(reference)
    mel = (float(np.mean(np.square(s - r))), float(np.mean(np.square(r - r.mean(axis=0)))))
  return Result(summarize(counts, mel), per)


def _transcript_json(tr: Transcript) -> dict:
  words = stream_words(tr.texts)
  return {
    "words": [[round(w.time, 3), w.text] for w in words],
    "said": {str(t): s for t, s in enumerate(tr.texts) if s},
    "calls": [[round((t + 1) * MICRO_TURN_SECONDS, 3), c] for t, c in tr.calls],
    "results": [[round(t * MICRO_TURN_SECONDS, 3), r] for t, r in tr.results],
    "voiced_windows": [int(t) for t in np.flatnonzero(voiced_windows(tr.mel))],
  }


def write_outputs(result: Result, conversations: Sequence[Conversation], out_dir: str) -> None:
  """Per-conversation JSON and PNG and summary.json in `out_dir` (a local directory or a URL)."""
  paths.makedirs(out_dir)
  by_id = {c.id: c for c in conversations}
  for entry in result.conversations:
    live = entry["_live"]
    data = {k: v for k, v in entry.items() if not k.startswith("_")}
    with paths.open(paths.join(out_dir, f"{_safe(entry['id'])}.json"), "w") as f:
      json.dump(data, f, indent=1, default=_jsonable)
    plot_conversation(paths.join(out_dir, f"{_safe(entry['id'])}.png"), by_id[entry["id"]], live, entry)
  with paths.open(paths.join(out_dir, "summary.json"), "w") as f:
    json.dump(result.summary, f, indent=1, default=_jsonable)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _jsonable(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(type(x))


def plot_conversation(path: str, conv: Conversation, live: Transcript, entry: dict) -> None:
  """Reference and model turns, background calls and results, and voiced windows on one time axis."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  seconds = conv.windows * MICRO_TURN_SECONDS + MICRO_TURN_SECONDS
  fig, ax = plt.subplots(figsize=(max(10, seconds * 1.4), 4.2))
  rows = {"user": 3, "reference": 2, "model": 1}
  for ipu in user_ipus(conv):
    ax.broken_barh([(ipu.start, max(ipu.end - ipu.start, 0.05))], (rows["user"] - 0.3, 0.6), color="tab:blue")
    ax.text(ipu.start, rows["user"] + 0.35, " ".join(ipu.words), fontsize=7, color="tab:blue")
  for name, tr, colour in (("reference", conv.reference, "tab:green"), ("model", live, "tab:orange")):
    y = rows[name]
    voiced = voiced_windows(tr.mel)
    spans = [((t + 1) * MICRO_TURN_SECONDS, MICRO_TURN_SECONDS) for t in np.flatnonzero(voiced)]
    ax.broken_barh(spans, (y - 0.12, 0.24), color=colour, alpha=0.35)
    for u in utterances(stream_words(tr.texts)):
      ax.broken_barh([(u.start, u.end - u.start)], (y - 0.3, 0.6), facecolor="none", edgecolor=colour)
      ax.text(u.start, y + 0.35, " ".join(u.words), fontsize=7, color=colour)
    for t, c in tr.calls:
      ax.plot((t + 1) * MICRO_TURN_SECONDS, y - 0.45, marker="v", color="tab:red")
      ax.text((t + 1) * MICRO_TURN_SECONDS, y - 0.62, f"call: {c}", fontsize=6, color="tab:red")
    for t, r in tr.results:
      ax.plot(t * MICRO_TURN_SECONDS, y - 0.45, marker="^", color="tab:purple")
      ax.text(t * MICRO_TURN_SECONDS, y - 0.75, f"result: {r}", fontsize=6, color="tab:purple")
  ax.set_yticks(list(rows.values()), list(rows))
  ax.set_ylim(0.2, 3.8)
  ax.set_xlim(0, seconds)
  ax.set_xlabel("seconds")
  m = entry["metrics"]
  ax.set_title(
    f"{conv.id}: takeover {m['takeover_rate']:.2f}, word accuracy {m['answer_word_accuracy']:.2f}, "
    f"false takeovers {m['false_takeover_rate']:.2f}/turn, voiced agreement {m['voiced_agreement']:.2f}",
    fontsize=9,
  )
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


# -- inside a training run ----------------------------------------------------------------------


class TrainingProbe:
  """The duplex evaluation of a training run (config.eval): the held-out conversations are loaded
  once and one session is compiled once; each call scores the current parameters.

  Every process runs the probe on its first local device with a host copy of the parameters (the
  same computation everywhere, so no process waits on another): meant for models that fit one
  device, as the CPU presets do.
  """

  def __init__(self, config, graphdef):
    from data_pipelines.pipeline import resolve_dirs

    self.config, self.graphdef = config, graphdef
    self.dirs = [str(d) for d in resolve_dirs(config.eval.data)]
    for d in self.dirs:
      if not paths.is_file(paths.join(d, "manifest.json")):
        raise FileNotFoundError(
          f"config.eval.data: {d} is not an episode dataset (no manifest.json); build one with "
          "`python -m data_pipelines.build` or `python -m data_pipelines.sample_corpus`"
        )
    self.conversations, left_out = load_conversations(self.dirs, config, limit=config.eval.conversations)
    if not self.conversations:
      raise ValueError(f"config.eval.data={config.eval.data!r}: no conversation with audio ({left_out})")
    self.session = None

  def __call__(self, params, model_state) -> Result:
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    host = multihost_utils.process_allgather((params, model_state), tiled=True)
    local = jax.device_put(host, jax.local_devices()[0])
    model = nnx.merge(self.graphdef, *local)
    if self.session is None:
      self.session = make_session(model, self.config)
    else:
      self.session.set_model(model)
    return evaluate(SessionAgent(self.session), self.conversations, session=self.session)


def report(result: Result, *, max_turns: int = 16) -> str:
  """What happened in each expecting turn (user, model, reference), then the summary: for logs."""
  lines = []
  for entry in result.conversations:
    for turn in entry["turns"]:
      if not turn["expects_answer"] or len(lines) >= max_turns:
        continue
      latency = f"{turn['latency_s']:.1f}s" if "latency_s" in turn else "-"
      lines.append(
        f"  {entry['id']} {turn['end']:5.1f}s  user: {turn['user'][:40]!r}  model ({latency}): "
        f"{turn['model_answer'][:40]!r}  reference: {turn['reference_answer'][:40]!r}"
      )
  return "\n".join(lines + [format_summary(result.summary)])


# -- command line --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tmlx.eval duplex", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a workdir or checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--data", required=True, help="held-out episode datasets, comma separated")
  p.add_argument("--conversations", type=int, default=None, help="evaluate only the first N conversations")
  p.add_argument("--out", default=None, help="directory for per-conversation JSON/PNG and summary.json")
  p.add_argument("--seed", type=int, default=0, help="the session's sampling seed")
  p.add_argument("--temperature", type=float, default=None, help="text sampling temperature (config.stream)")
  p.add_argument("--top_p", type=float, default=None, help="text nucleus mass (config.stream)")
  p.add_argument("--audio_temperature", type=float, default=None, help="flow-head noise τ (config.stream)")
  p.add_argument("--audio_steps", type=int, default=None, help="flow-head Euler steps (config.stream)")
  p.add_argument("--window", type=int, default=None, help="attention window of the session (config.stream)")
  return p.parse_args(argv)


SUMMARY_ORDER = (
  "takeover_rate",
  "response_latency_s_p50",
  "audio_latency_s_p50",
  "answer_word_accuracy",
  "bg_call_rate",
  "bg_answer_rate",
  "false_takeover_rate",
  "barge_in_yield_s_p50",
  "voiced_agreement",
  "mel_error_vs_mean",
)


def format_summary(summary: dict) -> str:
  head = (
    f"{summary['conversations']} conversations, {summary['user_turns']} user turns "
    f"({summary['answers_expected']} expecting an answer, {summary['bg_questions']} needing the background "
    f"model), {summary['barge_ins']} barge-ins"
  )
  lines = [head] + [f"  {k:24s} {summary[k]:.3f}" for k in SUMMARY_ORDER if k in summary]
  return "\n".join(lines)


def make_session(model, config, seed: int = 0):
  from tmlx.stream.session import Session

  return Session(model, config, seed=seed)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax

  from tmlx.inference import load_model

  dirs = [d.strip() for d in args.data.split(",") if d.strip()]
  for d in dirs:
    if not paths.is_file(paths.join(d, "manifest.json")):
      raise SystemExit(f"--data {d}: no episode dataset here (no manifest.json); build one with data_pipelines.build")
  try:
    model, config, step = load_model(args.checkpoint, step=args.step, devices=jax.devices()[:1])
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint: {e}") from None
  for name in ("temperature", "top_p", "audio_temperature", "audio_steps", "window"):
    if getattr(args, name) is not None:
      config.stream[name] = getattr(args, name)
  conversations, left_out = load_conversations(dirs, config, limit=args.conversations)
  if not conversations:
    raise SystemExit(f"--data {args.data}: no conversation with audio ({left_out})")
  t0 = time.perf_counter()
  session = make_session(model, config, seed=args.seed)
  agent = SessionAgent(session)
  agent.seed = args.seed
  result = evaluate(agent, conversations, session=session)
  result.summary["checkpoint_step"] = step
  result.summary["seconds"] = round(time.perf_counter() - t0, 1)
  print(f"checkpoint step {step}: " + format_summary(result.summary))
  if args.out:
    write_outputs(result, conversations, args.out)
    print(f"wrote {args.out}/summary.json and a JSON and PNG per conversation")
  return 0


if __name__ == "__main__":
  sys.exit(main())
