"""The duplex scores of one conversation (`tmlx.eval.duplex` defines them): the words,
utterances, user turns and voiced audio of a live transcript against the reference's, per turn,
and the metrics pooled over conversations (`summarize`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines.contract import FRAMES_PER_MICRO_TURN, MICRO_TURN_SECONDS
from tmlx.eval.conversations import Conversation, Transcript, joined_with_times, normalize_word

FRAME_S = MICRO_TURN_SECONDS / FRAMES_PER_MICRO_TURN
IPU_GAP_S = 0.25
UTTERANCE_GAP_S = 0.8
WORD_S = 0.4
GRACE_S = 0.4
VOICED_LEVEL = -0.5  # normalized log-mel; silence of a recording is about -0.82, speech about 0
VOICED_FRAMES = 4
VOICED_RUN = 3
BACKCHANNELS = frozenset({"mm-hmm", "mhm", "uh-huh", "hmm", "yeah", "yes", "okay", "ok", "right", "sure"})

_SPECIAL = re.compile(r"<bg_call>.*?(</bg_call>|$)|</?[a-z_]+>", re.S)


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


def stream_words(texts: Sequence[str]) -> list[Word]:
  """The words of a text stream (one string per micro-turn), each at the start of the window it is
  played in; `<bg_call>` spans and other specials are not words."""
  joined, times = joined_with_times(texts)
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
  """The user's turns, by the reference model's responses (`tmlx.eval.duplex`'s docstring)."""
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
  """Per-turn results and pooled counts of one conversation (`tmlx.eval.duplex`'s docstring)."""
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
