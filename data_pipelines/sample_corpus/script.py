"""What the sample corpus says: its vocabulary, the seeded script of a conversation, and text documents.

A script is a greeting, then one question-answer exchange per topic (colours, arithmetic, city facts,
a story, the time and the weather) in random order, then a closing. Every reply is a function of
what the user said, so that a reply can be scored against the recorded one. Asking for the time or
the weather makes the model send a background call (`Call`, e.g. "weather in Paris?") and say the
answer once its result has arrived; some questions are typed (`Type`) rather than spoken.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


def pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def cap(text: str) -> str:
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
  return pick(
    rng,
    [
      [Say("user", "Hi there."), Say("model", "Hello! How can I help?")],
      [Say("user", "Hello."), Say("model", "Hi! What can I do for you?")],
      [Say("user", "Good morning."), Say("model", "Good morning to you.")],
      [Say("user", "Hey, how are you?"), Say("model", "I am fine, thank you. And you?"), Say("user", "Good, thanks.")],
    ],
  )


def closing_exchange(rng) -> list:
  user, reply = pick(
    rng,
    [("Thanks, bye.", "Goodbye!"), ("Okay, thank you.", "You are welcome."), ("Great, goodbye.", "Have a nice day.")],
  )
  return [Say("user", user), Say("model", reply)]


def _colour(rng, typed: bool) -> list:
  form = int(rng.integers(3))
  if form == 0:
    thing, colour = pick(rng, THINGS)
    return [Say("user", f"What colour is {thing}?"), Say("model", f"{cap(thing)} is {colour}.")]
  colour = pick(rng, list(COLOURS))
  if form == 1:
    return [Say("user", f"My favourite colour is {colour}."), Say("model", f"{cap(colour)} is a lovely colour.")]
  answer = f"Yes, {colour} is nice." if colour in WARM_COLOURS else f"I like {colour} a lot."
  return [Say("user", f"Do you like {colour}?"), Say("model", answer)]


def _numbers(rng, typed: bool) -> list:
  if rng.random() < 0.25:
    n = int(rng.integers(3, 7))
    counted = ", ".join(number_words(i) for i in range(1, n + 1))
    return [Say("user", f"Can you count to {number_words(n)}?"), Say("model", cap(counted) + ".")]
  a, b = sorted(int(x) for x in rng.integers(1, 10, 2))[::-1]
  op, sym, value = pick(rng, [("plus", "+", a + b), ("times", "*", a * b), ("minus", "-", a - b)])
  answer = Say("model", f"{cap(number_words(a))} {op} {number_words(b)} is {number_words(value)}.")
  if typed:
    return [Type(f"what is {a} {sym} {b}?"), answer]
  return [Say("user", f"What is {number_words(a)} {op} {number_words(b)}?"), answer]


def _city(rng, typed: bool) -> list:
  city = pick(rng, list(CITIES))
  return [Say("user", f"Tell me about {city}."), Say("model", CITIES[city], interruptible=True)]


def _time(rng, typed: bool) -> list:
  hour, minute = int(rng.integers(0, 24)), int(rng.integers(0, 60))
  question = (
    Type("what time is it?") if typed else Say("user", pick(rng, ["What time is it?", "Do you know the time?"]))
  )
  spoken = "o'clock" if minute == 0 else f"oh {number_words(minute)}" if minute < 10 else number_words(minute)
  steps = [question, Call("time?", f"{hour:02d}:{minute:02d}"), Say("model", "Let me check.")]
  return steps + [Say("model", f"It is {number_words(hour)} {spoken}.", after_result=True)]


def _weather(rng, typed: bool) -> list:
  city, condition = pick(rng, list(CITIES)), pick(rng, CONDITIONS)
  temp = int(rng.integers(-5, 33))
  question = (
    Type(f"weather in {city}?")
    if typed
    else Say("user", pick(rng, [f"What is the weather in {city}?", f"How is the weather in {city} today?"]))
  )
  steps = [question, Call(f"weather in {city}?", f"{condition} {temp}C"), Say("model", "One moment.")]
  answer = f"It is {condition} and {number_words(temp)} degrees in {city}."
  return steps + [Say("model", answer, after_result=True)]


def _story(rng, typed: bool) -> list:
  thing = pick(rng, ["a big brown dog", "two white swans", "a tiny red car", "an old man with a kite"])
  place, reply = pick(rng, list(STORY_REPLIES.items()))
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


def txt_document(rng: np.random.Generator, k: int) -> tuple[str, str]:
  kind = ("colours", "numbers", "cities", "weather")[k % 4]
  if kind == "colours":
    things = [THINGS[i] for i in rng.permutation(len(THINGS))]
    first = " ".join(f"{cap(t)} is {c}." for t, c in things[:4])
    second = " ".join(f"{cap(t)} is {c}." for t, c in things[4:])
    return kind, f"Colours of things.\n\n{first}\n\n{second}\n"
  if kind == "numbers":
    sums = []
    for _ in range(5):
      a, b = (int(x) for x in rng.integers(1, 10, 2))
      sums.append(f"{cap(number_words(a))} plus {number_words(b)} is {number_words(a + b)}.")
    count = ", ".join(number_words(i) for i in range(1, 11))
    return kind, f"Numbers.\n\n{cap(count)}.\n\n" + " ".join(sums) + "\n"
  if kind == "cities":
    names = [list(CITIES)[i] for i in rng.permutation(len(CITIES))[:3]]
    return kind, "Cities.\n\n" + "\n\n".join(CITIES[n] for n in names) + "\n"
  lines = []
  for city in [list(CITIES)[i] for i in rng.permutation(len(CITIES))[:4]]:
    temp = int(rng.integers(-5, 33))
    lines.append(f"In {city} it is {pick(rng, CONDITIONS)} and {number_words(temp)} degrees.")
  return kind, "Weather report.\n\n" + " ".join(lines[:2]) + "\n\n" + " ".join(lines[2:]) + "\n"


def chat(rng: np.random.Generator) -> dict:
  """A chat as text turns: the script's steps, with each background result folded into the answer."""
  turns = []
  for exchange in script(rng, events=True, first=None, typed_first=False)[:4] + [closing_exchange(rng)]:
    for step in exchange:
      if isinstance(step, Say):
        turns.append({"speaker": step.speaker, "text": step.text})
      elif isinstance(step, Type):
        turns.append({"speaker": "user", "text": step.text})
  return {"turns": turns}
