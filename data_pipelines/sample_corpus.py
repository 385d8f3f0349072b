"""Generates a small, real sample corpus: spoken two-speaker conversations, videos and text documents.

    python -m data_pipelines.sample_corpus --out=DIR [--seed=0] [--conversations=12] [--videos=3]
        [--texts=10] [--heldout=4] [--seconds=10] [--frame_size=80] [--raw=RAW_DIR]

Conversations follow a small seeded script of question-answer exchanges (greetings, colours,
arithmetic, city facts, the time and the weather, goodbyes) with turn gaps, occasional overlaps,
mid-turn pauses (the user hesitates for 0.5-1 s), backchannels ("mm-hmm", "yeah") and barge-ins.
Asking for the time or the weather makes the model send a background call (`bg_calls`, e.g.
"weather in Paris?"), say "Let me check." or "One moment.", and say the answer once the result
(`bg_results`, e.g. "sunny 21C") has arrived 0.4-1.0 s after the call; some questions are typed
(`typed_text`) rather than spoken. Every reply is a function of what the user said, and the model
reacts (answers, calls, backchannels, stops when cut off) no sooner than 200 ms after what it
reacts to: the task is well posed for a causal model that hears in 200 ms micro-turns, and a reply
can be scored against the recorded one (`python -m tmlx.eval duplex`). Speech is synthesized word
by word with espeak-ng (one call per distinct word and voice, cached) and placed on the timeline,
so every word's start and end time is exact. The user's voice varies by conversation; the model's
voice is fixed.

The raw inputs are written to RAW_DIR (a temporary directory by default) in the formats that
`data_pipelines.build` reads: stereo FLAC or paired WAV files (some at 22,050 Hz) with JSON, TextGrid
or CTM transcripts; MP4 videos (a disc in the colour being talked about, and one level bar per
speaker) with a stereo audio track; .txt notes and a .jsonl file of chats. The builders then
write DIR/conversations, DIR/video and DIR/text, and the held-out DIR/heldout/conversations (and
one held-out video in DIR/heldout/video), drawn from random streams of their own; their summaries
are printed.

For more data, raise --conversations, --videos, --texts, --heldout or --seconds (per
conversation), and vary --seed. Output is deterministic given the flags. The defaults keep the
datasets under 4.5 MB (the committed sample in data/sample). espeak-ng (Debian package `espeak-ng`) is needed only to
generate; reading the corpus needs nothing beyond the project's dependencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import soundfile as sf
import soxr
from praatio import textgrid
from praatio.data_classes.interval_tier import IntervalTier
from praatio.data_classes.point_tier import PointTier

from data_pipelines import build, video
from data_pipelines.episode import MICRO_TURN_SECONDS, SAMPLE_RATE
from tmlx import paths

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
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 180, 60),
  "blue": (40, 90, 230),
  "yellow": (240, 220, 40),
  "orange": (245, 140, 30),
  "purple": (140, 60, 190),
  "pink": (245, 130, 190),
  "white": (245, 245, 245),
}
THINGS = (
  ("the sky", "blue"),
  ("grass", "green"),
  ("a banana", "yellow"),
  ("snow", "white"),
  ("a strawberry", "red"),
  ("an orange", "orange"),
  ("a plum", "purple"),
  ("a flamingo", "pink"),
)
CITIES = {
  "Paris": "Paris is the capital of France. It is known for the Eiffel tower, fresh bread and long walks by the river.",
  "London": "London is the capital of England. It has red buses, old bridges and a very big clock called Big Ben.",
  "Tokyo": "Tokyo is the capital of Japan. It is one of the biggest cities in the world, with fast trains everywhere.",
  "Rome": "Rome is the capital of Italy. It is very old, and people come to see the ruins and the fountains.",
  "Oslo": "Oslo is the capital of Norway. It sits at the end of a long fjord, with forests and hills all around it.",
  "Cairo": "Cairo is the capital of Egypt. It lies on the river Nile, and the great pyramids are close to the city.",
}
# Every reply is a function of what the user said, so that a reply can be scored against the recorded one.
WARM_COLOURS = ("red", "yellow", "orange", "pink")
STORY_REPLIES = {
  "the park": "That sounds like a lovely day.",
  "the beach": "Oh, how nice!",
  "the market": "That must have been fun.",
}
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy")
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
_ONES += "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
  """English words for -99..99, e.g. 42 -> "forty two"."""
  if n < 0:
    return "minus " + number_words(-n)
  if n < 20:
    return _ONES[n]
  tens, ones = divmod(n, 10)
  return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


# A script is a list of steps: spoken words, typed user text, or a background call.
@dataclasses.dataclass
class Say:
  speaker: str
  text: str
  after_result: bool = False  # starts only after the pending background result has arrived
  interruptible: bool = False  # the user may barge in


@dataclasses.dataclass
class Type:
  text: str


@dataclasses.dataclass
class Call:
  query: str
  result: str


def _greeting(rng) -> list:
  return _pick(
    rng,
    [
      [Say("user", "Hi there."), Say("model", "Hello! How can I help?")],
      [Say("user", "Hello."), Say("model", "Hi! What can I do for you?")],
      [Say("user", "Good morning."), Say("model", "Good morning to you.")],
      [Say("user", "Hey, how are you?"), Say("model", "I am fine, thank you. And you?"), Say("user", "Good, thanks.")],
    ],
  )


def _closing(rng) -> list:
  user, reply = _pick(
    rng,
    [("Thanks, bye.", "Goodbye!"), ("Okay, thank you.", "You are welcome."), ("Great, goodbye.", "Have a nice day.")],
  )
  return [Say("user", user), Say("model", reply)]


def _colour(rng, typed: bool) -> list:
  form = int(rng.integers(3))
  if form == 0:
    thing, colour = _pick(rng, THINGS)
    return [Say("user", f"What colour is {thing}?"), Say("model", f"{_cap(thing)} is {colour}.")]
  colour = _pick(rng, list(COLOURS))
  if form == 1:
    return [Say("user", f"My favourite colour is {colour}."), Say("model", f"{_cap(colour)} is a lovely colour.")]
  answer = f"Yes, {colour} is nice." if colour in WARM_COLOURS else f"I like {colour} a lot."
  return [Say("user", f"Do you like {colour}?"), Say("model", answer)]


def _numbers(rng, typed: bool) -> list:
  if rng.random() < 0.25:
    n = int(rng.integers(3, 7))
    counted = ", ".join(number_words(i) for i in range(1, n + 1))
    return [Say("user", f"Can you count to {number_words(n)}?"), Say("model", _cap(counted) + ".")]
  a, b = sorted(int(x) for x in rng.integers(1, 10, 2))[::-1]
  op, sym, value = _pick(rng, [("plus", "+", a + b), ("times", "*", a * b), ("minus", "-", a - b)])
  answer = Say("model", f"{_cap(number_words(a))} {op} {number_words(b)} is {number_words(value)}.")
  if typed:
    return [Type(f"what is {a} {sym} {b}?"), answer]
  return [Say("user", f"What is {number_words(a)} {op} {number_words(b)}?"), answer]


def _city(rng, typed: bool) -> list:
  city = _pick(rng, list(CITIES))
  return [Say("user", f"Tell me about {city}."), Say("model", CITIES[city], interruptible=True)]


def _time(rng, typed: bool) -> list:
  hour, minute = int(rng.integers(0, 24)), int(rng.integers(0, 60))
  question = (
    Type("what time is it?") if typed else Say("user", _pick(rng, ["What time is it?", "Do you know the time?"]))
  )
  spoken = "o'clock" if minute == 0 else f"oh {number_words(minute)}" if minute < 10 else number_words(minute)
  steps = [question, Call("time?", f"{hour:02d}:{minute:02d}"), Say("model", "Let me check.")]
  return steps + [Say("model", f"It is {number_words(hour)} {spoken}.", after_result=True)]


def _weather(rng, typed: bool) -> list:
  city, condition = _pick(rng, list(CITIES)), _pick(rng, CONDITIONS)
  temp = int(rng.integers(-5, 33))
  question = (
    Type(f"weather in {city}?")
    if typed
    else Say("user", _pick(rng, [f"What is the weather in {city}?", f"How is the weather in {city} today?"]))
  )
  steps = [question, Call(f"weather in {city}?", f"{condition} {temp}C"), Say("model", "One moment.")]
  answer = f"It is {condition} and {number_words(temp)} degrees in {city}."
  return steps + [Say("model", answer, after_result=True)]


def _story(rng, typed: bool) -> list:
  thing = _pick(rng, ["a big brown dog", "two white swans", "a tiny red car", "an old man with a kite"])
  place, reply = _pick(rng, list(STORY_REPLIES.items()))
  return [Say("user", f"I went to {place} today, and I saw {thing}."), Say("model", reply)]


TOPICS = {"colour": _colour, "numbers": _numbers, "city": _city, "story": _story, "time": _time, "weather": _weather}
EVENT_TOPICS = ("time", "weather")


def script(rng: np.random.Generator, *, events: bool, first: str | None, typed_first: bool) -> list:
  """A greeting, then one exchange per topic in random order (`first` leads; events=False leaves out time and
  weather). A numbers, time or weather question is typed instead of spoken if it leads and `typed_first`, else
  with probability 0.15 (never without events)."""
  names = [t for t in TOPICS if events or t not in EVENT_TOPICS]
  exchanges = [_greeting(rng)]
  order = [first] if first else []
  order += [names[i] for i in rng.permutation(len(names)) if names[i] != first]
  for i, name in enumerate(order):
    typed = events and (typed_first if i == 0 else rng.random() < 0.15)
    exchanges.append(TOPICS[name](rng, typed and name in ("numbers", "time", "weather")))
  return exchanges


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
      at = _end(_pick(rng, breaks)) + float(rng.uniform(0.0, 0.15)) + (REACTION_S if other == "model" else 0.0)
      if at > self.last_end[other] + 0.1:
        self._place(other, _pick(rng, BACKCHANNELS), at)

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
  timeline = Timeline(rng, voices, _pick(rng, USER_VOICES))
  greeting, *topics = script(rng, events=events, first=first, typed_first=typed_first)
  closing = _closing(rng)
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


def _transcript_json(conv: Conversation) -> dict:
  out = {s: [{"word": w, "start": a, "end": b} for a, b, w in conv.words[s]] for s in ("user", "model")}
  out.update({k: [{"time": t, "text": x} for t, x in v] for k, v in conv.events.items() if v})
  return out


def write_conversation(raw: pathlib.Path, name: str, conv: Conversation, *, layout: str, transcript: str, rate: int):
  """Writes audio (`stereo` FLAC or `paired` WAVs at `rate`) and a json/TextGrid/ctm transcript."""
  audio = conv.audio
  if rate != SAMPLE_RATE:
    audio = soxr.resample(audio.T, SAMPLE_RATE, rate).T.astype(np.float32)
  if layout == "stereo":
    sf.write(raw / f"{name}.flac", audio.T, rate, subtype="PCM_16")
  else:
    sf.write(raw / f"{name}.user.wav", audio[0], rate, subtype="PCM_16")
    sf.write(raw / f"{name}.model.wav", audio[1], rate, subtype="PCM_16")
  if transcript == "json":
    (raw / f"{name}.json").write_text(json.dumps(_transcript_json(conv), indent=1) + "\n")
  elif transcript == "TextGrid":
    grid = textgrid.Textgrid()
    for speaker in ("user", "model"):
      grid.addTier(IntervalTier(speaker, [(a, b, w) for a, b, w in conv.words[speaker]], 0, conv.duration))
    for field, events in conv.events.items():
      if events:
        grid.addTier(PointTier(field, [(t, x) for t, x in events], 0, conv.duration))
    grid.save(str(raw / f"{name}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
  else:
    lines = [";; utterance channel start duration word"]
    for channel, speaker in (("A", "user"), ("B", "model")):
      lines += [f"{name} {channel} {a:.3f} {b - a:.3f} {w}" for a, b, w in conv.words[speaker]]
    (raw / f"{name}.ctm").write_text("\n".join(lines) + "\n")


def video_frames(conv: Conversation, fps: float, size: int) -> np.ndarray:
  """Frames [T, size, size, 3]: a disc in the colour last spoken, and user/model level bars."""
  colour_marks = sorted(
    (a, COLOURS[re.sub(r"[^a-z]", "", w.lower())])
    for s in ("user", "model")
    for a, _, w in conv.words[s]
    if re.sub(r"[^a-z]", "", w.lower()) in COLOURS
  )
  count = int(np.ceil(conv.duration * fps - 1e-9))
  yy, xx = np.mgrid[0:size, 0:size]
  disc = (yy - 0.4 * size) ** 2 + (xx - 0.5 * size) ** 2 <= (0.28 * size) ** 2
  frames = np.empty((count, size, size, 3), np.uint8)
  window = round(SAMPLE_RATE / fps)
  for k in range(count):
    t = k / fps
    colour = (128, 128, 128)
    for at, c in colour_marks:
      if at <= t:
        colour = c
    frame = frames[k]
    frame[:] = (30, 30, 30)
    frame[disc] = colour
    s = round(t * SAMPLE_RATE)
    for c, (x0, bar) in enumerate(((0.05, (60, 200, 220)), (0.55, (250, 150, 40)))):
      level = float(np.sqrt(np.mean(conv.audio[c, s : s + window] ** 2))) if s < conv.audio.shape[1] else 0.0
      height = int(min(level * 10.0, 1.0) * 0.3 * size)
      if height:
        frame[size - 2 - height : size - 2, int(x0 * size) : int((x0 + 0.4) * size)] = bar
  return frames


def _txt_document(rng: np.random.Generator, k: int) -> tuple[str, str]:
  kind = ("colours", "numbers", "cities", "weather")[k % 4]
  if kind == "colours":
    things = [THINGS[i] for i in rng.permutation(len(THINGS))]
    first = " ".join(f"{_cap(t)} is {c}." for t, c in things[:4])
    second = " ".join(f"{_cap(t)} is {c}." for t, c in things[4:])
    return kind, f"Colours of things.\n\n{first}\n\n{second}\n"
  if kind == "numbers":
    sums = []
    for _ in range(5):
      a, b = (int(x) for x in rng.integers(1, 10, 2))
      sums.append(f"{_cap(number_words(a))} plus {number_words(b)} is {number_words(a + b)}.")
    count = ", ".join(number_words(i) for i in range(1, 11))
    return kind, f"Numbers.\n\n{_cap(count)}.\n\n" + " ".join(sums) + "\n"
  if kind == "cities":
    names = [list(CITIES)[i] for i in rng.permutation(len(CITIES))[:3]]
    return kind, "Cities.\n\n" + "\n\n".join(CITIES[n] for n in names) + "\n"
  lines = []
  for city in [list(CITIES)[i] for i in rng.permutation(len(CITIES))[:4]]:
    temp = int(rng.integers(-5, 33))
    lines.append(f"In {city} it is {_pick(rng, CONDITIONS)} and {number_words(temp)} degrees.")
  return kind, "Weather report.\n\n" + " ".join(lines[:2]) + "\n\n" + " ".join(lines[2:]) + "\n"


def _chat(rng: np.random.Generator) -> dict:
  """A chat as text turns: the script's steps, with each background result folded into the answer."""
  turns = []
  for exchange in script(rng, events=True, first=None, typed_first=False)[:4] + [_closing(rng)]:
    for step in exchange:
      if isinstance(step, Say):
        turns.append({"speaker": step.speaker, "text": step.text})
      elif isinstance(step, Type):
        turns.append({"speaker": "user", "text": step.text})
  return {"turns": turns}


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng([seed, *key])


def _conversations(raw: pathlib.Path, voices: Voices, seed: int, stream: int, count: int, seconds: float) -> None:
  """Writes `count` conversations drawn from random stream `stream`, in every raw format the builder reads."""
  for i in range(count):
    transcript = "TextGrid" if i % 8 == 3 else "ctm" if i % 8 == 6 else "json"
    events = transcript != "ctm"  # CTM has no events
    first = None
    if events and i % 3 == 0:
      first = EVENT_TOPICS[i // 3 % 2]
    elif events and i % 3 == 1:
      first = ("numbers", "weather", "time")[i // 3 % 3]
    conv = conversation(_rng(seed, stream, i), voices, seconds, events=events, first=first, typed_first=i % 3 == 1)
    layout = "paired" if i % 4 == 1 or transcript == "ctm" else "stereo"
    rate = 22050 if i % 5 == 2 else SAMPLE_RATE
    write_conversation(raw, f"conv-{i:03d}", conv, layout=layout, transcript=transcript, rate=rate)


def _videos(raw: pathlib.Path, voices: Voices, seed: int, stream: int, count: int, seconds: float, size: int) -> None:
  fps = 1 / MICRO_TURN_SECONDS
  for i in range(count):
    conv = conversation(_rng(seed, stream, i), voices, seconds, events=True, first="colour", typed_first=False)
    name = f"video-{i:03d}"
    video.render_mp4(raw / f"{name}.mp4", video_frames(conv, fps, size), fps, conv.audio)
    (raw / f"{name}.json").write_text(json.dumps(_transcript_json(conv), indent=1) + "\n")


def generate(
  out: str | pathlib.Path,
  *,
  seed: int = 0,
  conversations: int = 12,
  videos: int = 3,
  texts: int = 10,
  heldout: int = 4,
  seconds: float = 10.0,
  frame_size: int = 80,
  raw: str | pathlib.Path | None = None,
) -> dict[str, str]:
  """Writes raw inputs, then builds DIR/conversations, DIR/video and DIR/text, and the held-out
  DIR/heldout/conversations (and DIR/heldout/video, one video, when there are videos) from random
  streams of their own; returns their summaries. DIR may be a gs:// URL (built locally, then copied)."""
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(raw) if raw else pathlib.Path(tmp)
    names = ["conversations", "video", "text"]
    if heldout > 0:
      names += ["heldout/conversations"] + (["heldout/video"] if videos > 0 else [])
    dirs = {name: root / name for name in names}
    for d in dirs.values():
      d.mkdir(parents=True, exist_ok=True)
    voices = Voices(pathlib.Path(tmp))
    _conversations(dirs["conversations"], voices, seed, 0, conversations, seconds)
    _videos(dirs["video"], voices, seed, 1, videos, seconds, frame_size)
    n_txt = min(4, texts)
    for i in range(n_txt):
      kind, text = _txt_document(_rng(seed, 2, i), i)
      (dirs["text"] / f"notes-{i:02d}-{kind}.txt").write_text(text)
    if texts > n_txt:
      chats = [json.dumps(_chat(_rng(seed, 3, i))) for i in range(texts - n_txt)]
      (dirs["text"] / "chats.jsonl").write_text("\n".join(chats) + "\n")
    if heldout > 0:
      _conversations(dirs["heldout/conversations"], voices, seed, 4, heldout, seconds)
      if videos > 0:
        _videos(dirs["heldout/video"], voices, seed, 5, 1, seconds, frame_size)

    fps = 1 / MICRO_TURN_SECONDS
    built = {}
    for name, d in dirs.items():
      if name.endswith("video"):
        built[name] = build.build_video_episodes([d], fps=fps, width=frame_size, height=frame_size, on_error="raise")
      elif name.endswith("conversations"):
        built[name] = build.build_audio_episodes([d], on_error="raise")
      else:
        built[name] = build.build_text_episodes([d], on_error="raise")
  summaries = {}
  for name, (episodes, skips) in built.items():
    written = build.write_episodes(episodes, paths.join(out, name)) if episodes else 0
    summaries[name] = build.summary(written, skips)
  return summaries


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.sample_corpus", description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for the conversations, video and text datasets")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--conversations", type=int, default=12, help="spoken conversations (audio dataset)")
  parser.add_argument("--videos", type=int, default=3, help="conversations rendered as MP4 (video dataset)")
  parser.add_argument("--texts", type=int, default=10, help="text documents: up to 4 .txt notes, the rest chats")
  parser.add_argument(
    "--heldout", type=int, default=4, help="held-out conversations, from their own random stream (DIR/heldout)"
  )
  parser.add_argument("--seconds", type=float, default=10.0, help="approximate length of each conversation")
  parser.add_argument("--frame_size", type=int, default=80, help="square video frame side, a multiple of 40")
  parser.add_argument("--raw", default=None, help="keep the raw inputs in this directory")
  args = parser.parse_args(argv)
  summaries = generate(
    args.out,
    seed=args.seed,
    conversations=args.conversations,
    videos=args.videos,
    texts=args.texts,
    heldout=args.heldout,
    seconds=args.seconds,
    frame_size=args.frame_size,
    raw=args.raw,
  )
  for name, text in summaries.items():
    print(f"[{name}]\n{text}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
