"""How the sample corpus sounds and when: espeak-ng word clips (`Voices`) placed on a timeline
(`Timeline`) with turn gaps, overlaps, mid-turn pauses, backchannels and barge-ins, rendered into a
`Conversation` with exact word times.

Speech is synthesized word by word (one espeak-ng call per distinct word and voice, cached). The
user's voice varies by conversation; the model's voice is fixed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
import subprocess

import numpy as np
import soundfile as sf
import soxr

from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.sample_corpus.script import Say, Type, closing_exchange, pick, script

MODEL_VOICE = ("en-gb+f3", 180)
# The model reacts to what it hears no sooner than this after it (a background call, an answer after a
# result, a backchannel, stopping when the user cuts in), so that every reaction lands in a micro-turn
# after the one that heard its cause: the training data never asks the model to act on what it has not
# heard yet.
REACTION_S = 0.2
# Mid-turn pauses: a user utterance of 3 or more words pauses this long after one of its first words
# with this probability; the model must wait them out.
HESITATION_PROB = 0.3
HESITATION_S = (0.5, 1.0)
USER_VOICES = (("en-us", 185), ("en-us+m3", 175), ("en-gb-scotland", 185), ("en-029", 180))
BACKCHANNELS = ("mm-hmm", "yeah", "okay", "right")


class Voices:
  """espeak-ng word clips at 16 kHz, trimmed to the speech, cached per (voice, word)."""

  def __init__(self, workdir: pathlib.Path):
    if shutil.which("espeak-ng") is None:
      raise SystemExit("espeak-ng not found: install the Debian package espeak-ng to generate the sample corpus")
    self.workdir = workdir
    self.cache: dict[tuple, np.ndarray] = {}

  def word(self, voice: tuple[str, int], text: str) -> np.ndarray:
    spoken = re.sub(r"[^a-z0-9'\-]", "", text.lower()).strip("-'")
    if not spoken:
      raise ValueError(f"nothing to say in the word {text!r}")
    key = (voice, spoken)
    if key not in self.cache:
      wav = self.workdir / "word.wav"
      subprocess.run(["espeak-ng", "-v", voice[0], "-s", str(voice[1]), "-w", str(wav), spoken], check=True)
      audio, rate = sf.read(str(wav), dtype="float32")
      self.cache[key] = _trim(soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32))
    return self.cache[key]


def _trim(audio: np.ndarray, frame: int = 80) -> np.ndarray:
  """Cuts leading and trailing frames quieter than 3% of the loudest one, with 2 ms fades."""
  n = len(audio) // frame
  rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
  active = np.nonzero(rms > max(2e-3, 0.03 * rms.max(initial=0)))[0]
  if not len(active):
    return audio[:frame].copy()
  clip = audio[active[0] * frame : (active[-1] + 1) * frame].copy()
  fade = np.linspace(0, 1, 32, dtype=np.float32)
  clip[:32] *= fade
  clip[-32:] *= fade[::-1]
  return clip


@dataclasses.dataclass
class Conversation:
  """A rendered conversation: float audio per speaker at 16 kHz, exact word times and events."""

  duration: float
  audio: np.ndarray  # float32 [2, N]: user, model
  words: dict  # speaker -> [(start, end, text)]
  events: dict  # typed_text / bg_calls / bg_results -> [(time, text)]


class Timeline:
  """Places script steps in time: turn gaps, overlaps, backchannels, barge-ins, background calls."""

  def __init__(self, rng: np.random.Generator, voices: Voices, user_voice: tuple[str, int]):
    self.rng, self.voices = rng, voices
    self.voice = {"user": user_voice, "model": MODEL_VOICE}
    self.words: dict[str, list] = {"user": [], "model": []}  # [start, clip, text]
    self.utterances: dict[str, list[list]] = {"user": [], "model": []}
    self.events: dict[str, list] = {"typed_text": [], "bg_calls": [], "bg_results": []}
    self.floor = float(rng.uniform(0.3, 0.6))  # when the current turn ends
    self.last_end = {"user": 0.0, "model": 0.0}
    self.last_speaker: str | None = None
    self.not_before = 0.0
    self.last_call = -1.0
    self.interruptible = False

  def run(self, steps: list) -> None:
    for step in steps:
      if isinstance(step, Say):
        self.say(step)
      elif isinstance(step, Type):
        t = self.floor + float(self.rng.uniform(0.3, 0.8))
        self.events["typed_text"].append((t, step.text))
        self.floor, self.last_speaker, self.interruptible = t, "user", False
      else:
        t = self.floor + REACTION_S + float(self.rng.uniform(0.0, 0.15))
        result = t + float(self.rng.uniform(0.4, 1.0))
        self.events["bg_calls"].append((t, step.query))
        self.events["bg_results"].append((result, step.result))
        self.last_call = t
        self.not_before = result + REACTION_S + float(self.rng.uniform(0.0, 0.2))

  def estimate(self, steps: list) -> float:
    """About how many seconds `steps` take: the words' clips plus typical pauses and call latencies."""
    total = 0.0
    for step in steps:
      if isinstance(step, Say):
        clips = [self.voices.word(self.voice[step.speaker], w) for w in step.text.split()]
        total += sum(len(c) / SAMPLE_RATE + 0.06 for c in clips) + 0.45
      else:
        total += 0.55 if isinstance(step, Type) else 0.9
    return total

  def _place(self, speaker: str, text: str, start: float, hesitation: tuple[int, float] | None = None) -> list:
    """Places the words of `text` from `start`; `hesitation` (k, seconds) pauses that long after word k."""
    placed, t = [], start
    for i, token in enumerate(text.split()):
      clip = self.voices.word(self.voice[speaker], token)
      start_sample = round(t * SAMPLE_RATE)
      placed.append([start_sample, clip, token])
      pause = 0.14 if token[-1] in ",." else 0.04
      if hesitation is not None and i == hesitation[0]:
        pause = hesitation[1]
      t = (start_sample + len(clip)) / SAMPLE_RATE + pause + float(self.rng.uniform(0, 0.04))
    self.words[speaker].extend(placed)
    self.last_end[speaker] = _end(placed[-1])
    return placed

  def say(self, step: Say) -> None:
    rng, speaker = self.rng, step.speaker
    other = "model" if speaker == "user" else "user"
    changed = self.last_speaker not in (None, speaker)
    start = self.floor + float(rng.uniform(0.25, 0.7) if changed else rng.uniform(0.12, 0.3))
    if changed and speaker == "user" and rng.random() < 0.3:
      start = self.floor - float(rng.uniform(0.05, 0.25))  # starts before the model has finished
    if changed and speaker == "user" and self.interruptible and rng.random() < 0.5:
      start = self._barge_in(other)
    if step.after_result:
      start = max(start, self.not_before)
    if speaker == "model":  # a call is made before what the model says about it ("Let me check.")
      start = max(start, self.last_call + 0.05)
    start = max(start, self.last_end[speaker] + 0.08, 0.05)
    n = len(step.text.split())
    hesitation = None
    if speaker == "user" and n >= 3 and rng.random() < HESITATION_PROB:  # a mid-turn pause: the model waits
      hesitation = (int(rng.integers(0, n - 2)), float(rng.uniform(*HESITATION_S)))
    placed = self._place(speaker, step.text, start, hesitation)
    self.utterances[speaker].append(placed)
    self.floor = max(self.floor, self.last_end[speaker])
    self.last_speaker, self.interruptible = speaker, step.interruptible
    breaks = [w for w in placed[1:-2] if w[2][-1] in ",.!?"]  # clause ends with two or more words after them
    if len(placed) >= 6 and breaks and rng.random() < 0.5:
      at = _end(pick(rng, breaks)) + float(rng.uniform(0.0, 0.15)) + (REACTION_S if other == "model" else 0.0)
      if at > self.last_end[other] + 0.1:
        self._place(other, pick(rng, BACKCHANNELS), at)

  def _barge_in(self, other: str) -> float:
    """The user cuts in during the other speaker's last utterance, which stops after the words it began
    before it could have heard the user (REACTION_S after the cut)."""
    utterance = self.utterances[other][-1]
    k = int(self.rng.integers(3, len(utterance) - 1))
    at = max(utterance[k][0] / SAMPLE_RATE + float(self.rng.uniform(0.05, 0.15)), self.last_end["user"] + 0.1)
    keep = [w for w in utterance if w[0] / SAMPLE_RATE < at + REACTION_S]
    dropped = {id(w) for w in utterance[len(keep) :]}
    self.words[other] = [w for w in self.words[other] if id(w) not in dropped]
    utterance[:] = keep
    self.last_end[other] = _end(keep[-1])
    self.floor = at
    return at

  def render(self) -> Conversation:
    ends = [self.floor] + [t for e in self.events.values() for t, _ in e]
    duration = round((max(ends) + float(self.rng.uniform(0.4, 0.8))) * SAMPLE_RATE) / SAMPLE_RATE
    audio = np.zeros((2, round(duration * SAMPLE_RATE)), np.float32)
    words = {}
    for c, speaker in enumerate(("user", "model")):
      gain = 0.6 if speaker == "model" else float(self.rng.uniform(0.4, 0.7))
      for s, clip, _ in self.words[speaker]:
        audio[c, s : s + len(clip)] += gain * clip
      words[speaker] = [(s / SAMPLE_RATE, _end([s, clip]), text) for s, clip, text in self.words[speaker]]
    return Conversation(duration, np.clip(audio, -1, 1), words, self.events)


def _end(word: list) -> float:
  return (word[0] + len(word[1])) / SAMPLE_RATE


def conversation(
  rng: np.random.Generator, voices: Voices, seconds: float, *, events: bool, first: str | None, typed_first: bool
) -> Conversation:
  """Renders topics (at least one; `first` always) that fit in about `seconds`, mostly with a greeting and closing."""
  timeline = Timeline(rng, voices, pick(rng, USER_VOICES))
  greeting, *topics = script(rng, events=events, first=first, typed_first=typed_first)
  closing = closing_exchange(rng)
  if rng.random() < 0.6:
    timeline.run(greeting)
  ran = False
  for i, exchange in enumerate(topics):
    if (i == 0 and first) or timeline.floor + timeline.estimate(exchange) <= seconds:
      timeline.run(exchange)
      ran = True
  if not ran:
    timeline.run(min(topics, key=timeline.estimate))
  if timeline.floor + timeline.estimate(closing) <= seconds + 1.0:
    timeline.run(closing)
  return timeline.render()
