"""Duplex behaviour evaluation (tmlx.eval.duplex): the scorer against scripted speakers on a scripted
conversation whose every event is known, and on the held-out sample conversations."""

import numpy as np
import pytest

from data_pipelines.contract import SAMPLE_RATE
from data_pipelines.episode import Episode, Event, Word, write_dataset
from tests.helpers import ROOT, tiny_config
from tmlx.eval import duplex

# (start, end, word) of a scripted conversation: a question with a mid-turn pause, a background-model
# question with a user backchannel over the answer, and a barge-in.
USER = [
  (0.50, 0.70, "What"),
  (0.75, 1.00, "colour"),  # then a 0.7 s mid-turn pause
  (1.70, 1.85, "is"),
  (1.90, 2.00, "the"),
  (2.05, 2.40, "sky?"),
  (4.60, 4.90, "What"),
  (4.95, 5.20, "time"),
  (5.25, 5.35, "is"),
  (5.40, 5.50, "it?"),
  (7.30, 7.60, "mm-hmm"),  # a backchannel while the model answers
  (8.60, 8.80, "Tell"),
  (8.85, 9.00, "me"),
  (9.05, 9.25, "about"),
  (9.30, 9.70, "Paris."),
  (10.60, 10.80, "Tell"),  # cuts the model off
  (10.85, 11.00, "me"),
  (11.05, 11.25, "about"),
  (11.30, 11.70, "Rome."),
]
MODEL = [
  (2.85, 3.00, "The"),
  (3.05, 3.30, "sky"),
  (3.35, 3.50, "is"),
  (3.55, 3.90, "blue."),
  (5.95, 6.10, "Let"),
  (6.15, 6.25, "me"),
  (6.30, 6.60, "check."),
  (6.85, 7.00, "It"),
  (7.05, 7.20, "is"),
  (7.25, 7.50, "six"),
  (7.55, 7.85, "fifty"),
  (7.90, 8.20, "two."),
  (10.05, 10.40, "Paris"),
  (10.45, 10.55, "is"),
  (10.60, 10.70, "the"),
  (10.75, 11.05, "capital"),
  (12.20, 12.50, "Rome"),
  (12.55, 12.70, "is"),
  (12.75, 13.10, "old."),
]
DURATION = 13.8


def _speech(words, rng) -> np.ndarray:
  audio = np.zeros(round(DURATION * SAMPLE_RATE), np.float32)
  for start, end, _ in words:
    a, b = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
    audio[a:b] = np.clip(0.3 * rng.standard_normal(b - a), -1, 1)
  return audio


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
  rng = np.random.default_rng(0)
  ep = Episode(
    id="scripted",
    duration=DURATION,
    user_audio=_speech(USER, rng),
    model_audio=_speech(MODEL, rng),
    user_words=[Word(*w) for w in USER],
    model_words=[Word(*w) for w in MODEL],
    bg_calls=[Event(5.75, "time?")],
    bg_results=[Event(6.42, "06:52")],
  )
  out = tmp_path_factory.mktemp("duplex") / "scripted"
  write_dataset([ep], out)
  (conv,), _ = duplex.load_conversations([str(out)], tiny_config())
  return conv


def _window(t: float) -> float:
  return int(t / 0.2 + 1e-6) * 0.2


class Delayed(duplex.ReplayAgent):
  """The reference, one micro-turn late."""

  def step(self, t, heard, bg_results):
    if t == 0:
      return duplex.SilentAgent().step(t, heard, bg_results)
    return super().step(t - 1, heard, bg_results)


class Scripted:
  """Says `words[t]` in micro-turn t (played in window t+1) and silence otherwise, or the reference
  where `words` has no entry and `replay` is set."""

  def __init__(self, words: dict[int, str], replay: bool = False):
    self.words, self.replay = words, replay

  def reset(self, conversation):
    self.reference = duplex.ReplayAgent()
    self.reference.reset(conversation)

  def step(self, t, heard, bg_results):
    if t in self.words:
      return duplex.Said(self.words[t], np.zeros((16, 80), np.float32), [])
    if self.replay:
      return self.reference.step(t, heard, bg_results)
    return duplex.SilentAgent().step(t, heard, bg_results)


def test_the_reference_timeline_has_the_scripted_turns(scripted):
  turns = duplex.user_turns(scripted)
  assert [" ".join(w for i in t.ipus for w in i.words) for t in turns] == [
    "what colour is the sky",
    "what time is it",
    "tell me about paris",
    "tell me about rome",
  ]  # the backchannel is no turn; the pause is inside the first
  assert [len(t.ipus) for t in turns] == [2, 1, 1, 1] and all(t.expects_answer for t in turns)


def test_a_replay_of_the_reference_scores_as_the_reference(scripted):
  result = duplex.evaluate(duplex.ReplayAgent(), [scripted])
  s = result.summary
  assert (s["answers_expected"], s["bg_questions"], s["barge_ins"]) == (4, 1, 1)
  assert s["takeover_rate"] == 1.0 and s["answer_word_accuracy"] == 1.0
  assert s["bg_call_rate"] == 1.0 and s["bg_answer_rate"] == 1.0
  assert s["false_takeover_rate"] == 0.0 and s["voiced_agreement"] == 1.0
  # Latency: the recorded first word of each answer, in the window it is played in.
  firsts = [2.85, 5.95, 10.05, 12.20]
  got = [t["latency_s"] for t in result.conversations[0]["turns"]]
  ends = [2.40, 5.50, 9.70, 11.70]
  assert got == pytest.approx([_window(f) - e for f, e in zip(firsts, ends)], abs=1e-6)
  # The model's words say what the result said, which no one had said before.
  assert result.conversations[0]["turns"][1]["result_words"] == ["fifty", "six", "two"]  # "it", "is": said before
  # Barge-in: the model's "paris is the capital" runs on to 0.4 s after its last word's window.
  assert s["barge_in_yield_s_p50"] == pytest.approx(_window(10.75) + 0.4 - 10.60, abs=1e-6)


def test_a_silent_model_takes_no_turn_and_calls_nothing(scripted):
  s = duplex.evaluate(duplex.SilentAgent(), [scripted]).summary
  assert s["takeover_rate"] == 0.0 and s["answer_word_accuracy"] == 0.0 and s["bg_call_rate"] == 0.0
  assert s["barge_ins"] == 0 and s["false_takeover_rate"] == 0.0
  assert 0.3 < s["voiced_agreement"] < 0.8  # silent windows agree, the model's speech does not


def test_a_late_model_is_late_by_exactly_its_delay(scripted):
  ref = duplex.evaluate(duplex.ReplayAgent(), [scripted]).conversations[0]["turns"]
  late = duplex.evaluate(Delayed(), [scripted])
  got = late.conversations[0]["turns"]
  assert [t["latency_s"] for t in got] == pytest.approx([t["latency_s"] + 0.2 for t in ref], abs=1e-6)
  assert late.summary["takeover_rate"] == 1.0 and late.summary["answer_word_accuracy"] == 1.0
  # Its background call is late too, and so is the result; it still says it.
  assert late.summary["bg_call_rate"] == 1.0 and late.summary["bg_answer_rate"] == 1.0


def test_speaking_in_a_pause_or_over_the_user_is_a_false_takeover(scripted):
  # Micro-turn 5 plays in window 6 (1.2-1.4 s): inside the mid-turn pause; 23 plays at 4.8 s, while
  # the user asks for the time.
  s = duplex.evaluate(Scripted({5: " Green.", 23: " Hello there"}, replay=True), [scripted]).summary
  assert s["false_takeover_rate"] == pytest.approx(2 / 4)
  assert s["takeover_rate"] == 1.0
  # A backchannel is not a takeover.
  s = duplex.evaluate(Scripted({5: " yeah"}, replay=True), [scripted]).summary
  assert s["false_takeover_rate"] == 0.0


def test_a_model_that_talks_on_after_a_barge_in_yields_late(scripted):
  # The reference's last word, "capital", plays from 10.6 s (micro-turn 52); this one says 3 more.
  more = {t: " on" for t in range(53, 56)}
  s = duplex.evaluate(Scripted(more, replay=True), [scripted]).summary
  assert s["barge_ins"] == 1
  assert s["barge_in_yield_s_p50"] == pytest.approx((55 + 1) * 0.2 + 0.4 - 10.60, abs=1e-6)
  # Its extra words also cost it word accuracy on the answer it was giving.
  assert s["answer_word_accuracy"] < 1.0


def test_the_bundled_held_out_conversations_replay_perfectly():
  convs, _ = duplex.load_conversations([str(ROOT / "data/sample/heldout/conversations")], tiny_config())
  s = duplex.evaluate(duplex.ReplayAgent(), convs).summary
  assert s["answers_expected"] >= 6 and s["bg_questions"] >= 1
  for key in ("takeover_rate", "answer_word_accuracy", "bg_call_rate", "bg_answer_rate", "voiced_agreement"):
    assert s[key] == 1.0, key
  assert s["false_takeover_rate"] == 0.0
