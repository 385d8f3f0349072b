"""One micro-turn writer: a training row and a live session feed the model the same positions."""

import math

import numpy as np
import pytest

import data_pipelines
from data_pipelines import episode as ep_lib
from data_pipelines import microturn
from data_pipelines.align import AlignSpec, align
from data_pipelines.contract import MICRO_TURN_SECONDS, SAMPLE_RATE, SAMPLES_PER_MICRO_TURN, Kind, special_id
from data_pipelines.episode import Episode, EpisodeReader, Event, Word
from data_pipelines.tokenizer import ByteTokenizer
from tests.helpers import tiny_config
from tmlx.nn.model import ModelConfig
from tmlx.state import new_model
from tmlx.stream import Session, StreamConfig

WINDOWS = 12  # 11 micro-turns: O_t speaks window t + 1


def _window(time: float) -> int:
  return int(math.floor(time / MICRO_TURN_SECONDS + 1e-6))


def full_episode() -> Episode:
  """Both speakers' audio, frames in some windows, typed text, background calls and results (two
  results and a typed text in one window), and model words, one overflowing K_max = 8."""
  rng = np.random.default_rng(7)
  n = WINDOWS * SAMPLES_PER_MICRO_TURN
  t = np.arange(n) / SAMPLE_RATE
  user = 3000 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0) + rng.normal(0, 500, n)
  model = 4000 * np.sin(2 * np.pi * 500 * t) * (np.sin(2 * np.pi * 1.1 * t) > 0) + rng.normal(0, 300, n)
  times = np.array([0.25, 0.85, 0.9, 1.45, 2.05])  # windows 1, 4 (twice: the first counts), 7, 10
  return Episode(
    id="full",
    duration=WINDOWS * MICRO_TURN_SECONDS,
    user_audio=user.astype(np.int16),
    model_audio=model.astype(np.int16),
    frames=rng.integers(0, 256, (len(times), 80, 80, 3), dtype=np.uint8),
    frame_times=times,
    user_words=[Word(0.3, 0.5, "what"), Word(0.5, 0.7, "time")],
    model_words=[
      Word(0.45, 0.6, "hello"),  # window 2 → O_1
      Word(0.95, 1.3, "extraordinarily"),  # window 4 → O_3, overflowing into O_4
      Word(1.5, 1.7, "it's"),  # window 7 → O_6
      Word(1.72, 1.9, "five"),  # window 8 → O_7
    ],
    typed_text=[Event(0.45, "hi there"), Event(1.78, "ok")],  # windows 2, 8
    bg_calls=[Event(0.65, "time?")],  # window 3 → O_2
    bg_results=[Event(1.05, "14:05"), Event(1.7, "a"), Event(1.75, "bc")],  # windows 5, 8, 8
  )


def _config(mixture: str):
  c = tiny_config("tiny")
  c.data.source = "episodes"
  c.data.mixture = mixture
  c.data.on_error = "raise"
  c.data.seq_len = 512
  c.data.max_patches = 64
  c.model.compute_dtype = "float32"
  c.model.moe.capacity_factor = 0.0
  c.stream.window = 0
  c.model.attention_window = 0
  c.stream.max_positions = 512
  return c


def _row_from_micro_turn_0(source):
  """A row of `source` whose first window starts at micro-turn 0 and covers the whole episode."""
  for r in range(500):
    windows, _ = source.plan(0, r, read_media=False)
    if windows[0].start == 0 and windows[0].length == WINDOWS - 1:
      return source.row(0, r)
  raise AssertionError("no row in 500 starts its first window at micro-turn 0")


def test_a_live_session_feeds_the_model_exactly_the_training_row(tmp_path):
  """The episode's micro-turns through the real EpisodeSource and, micro-turn by micro-turn,
  through Session.step (its outputs forced to the row's): every position the session fed, as its
  programs received it, equals the row's, field by field."""
  ep = full_episode()
  ep_lib.write_dataset([ep], tmp_path / "ds", chunk_seconds=1.0)  # several chunks per window
  c = _config(str(tmp_path / "ds"))
  row = _row_from_micro_turn_0(data_pipelines.make_source(c))
  session = Session(new_model(ModelConfig.from_config(c.model), 0), StreamConfig.from_config(c), record_inputs=True)
  segment = row["segment_ids"] == 1
  for t in range(WINDOWS - 1):
    at = segment & (row["micro_turn"] == t)
    kind = row["kind"][at]
    frames = [i for i, ft in enumerate(ep.frame_times) if _window(ft) == t]
    typed = [e.text for e in ep.typed_text if _window(e.time) == t]
    assert len(typed) <= 1  # Session.step takes one typed text per micro-turn
    session.step(
      ep.user_audio[t * SAMPLES_PER_MICRO_TURN : (t + 1) * SAMPLES_PER_MICRO_TURN],
      frame=ep.frames[frames[0]] if frames else None,
      typed_text=typed[0] if typed else None,
      bg_results=[e.text for e in ep.bg_results if _window(e.time) == t],
      forced_text=row["tokens"][at][kind == Kind.TEXT_OUT].tolist(),
      forced_audio=row["dmel"][at][kind == Kind.AUDIO_OUT],
    )
    fed = session.fed[t]
    assert fed.micro_turn == t
    for name in ("kind", "tokens", "dmel", "positions"):
      np.testing.assert_array_equal(getattr(fed, name), row[name][at], err_msg=f"micro-turn {t}: field {name!r}")
    patches = row["patch_index"][at][kind == Kind.PATCH]
    np.testing.assert_array_equal(fed.patches, row["patches"][patches], err_msg=f"micro-turn {t}: patch pixels")
    np.testing.assert_array_equal(fed.patch_rowcol, row["patch_rowcol"][patches], err_msg=f"micro-turn {t}")
  # Everything a micro-turn can hold was compared.
  compared = segment & (row["micro_turn"] < WINDOWS - 1)
  assert compared.sum() == sum(len(f) for f in session.fed) == session.position
  kinds, tokens = row["kind"][compared], row["tokens"][compared]
  assert set(np.unique(kinds).tolist()) == set(Kind) - {Kind.PAD}
  assert (kinds == Kind.PATCH).sum() == 4 * 4  # frames in windows 1, 4, 7, 10, of 2x2 patches
  for name, count in (("<bg_result>", 3), ("<user_text>", 2), ("<bg_call>", 1), ("<eot>", WINDOWS - 1)):
    assert (tokens == special_id(name)).sum() == count, name
  said = ByteTokenizer().decode(tokens[kinds == Kind.TEXT_OUT].tolist()).replace("<eot>", "")
  assert said == "hello<bg_call>time?</bg_call> extraordinarily it's five"


def test_whole_episode_micro_turns_are_the_rows_and_the_planned_sizes(tmp_path):
  """`episode_micro_turns` over a whole episode (as an evaluator reads it) gives the row's micro-turns;
  each takes exactly the positions the alignment planned without media."""
  ep_lib.write_dataset([full_episode()], tmp_path / "ds", chunk_seconds=1.0)
  c = _config(str(tmp_path / "ds"))
  row = _row_from_micro_turn_0(data_pipelines.make_source(c))
  tok = ByteTokenizer()
  spec = AlignSpec(k_max=c.data.k_max, text_only_k_max=32, frame_height=80, frame_width=80, vocab_size=tok.vocab_size)
  ep = EpisodeReader(tmp_path / "ds").read(0)
  layout = align(ep, tok, spec, where="full")
  turns = microturn.episode_micro_turns(ep, layout, causal=True)
  assert [mt.index for mt in turns] == list(range(len(layout)))
  assert turns[8].bg_results == [tok.encode("a"), tok.encode("bc")] and turns[8].typed_text == [tok.encode("ok")]
  assert turns[5].bg_results == [tok.encode("14:05")] and turns[2].said_text[-1] == special_id("<eot>")
  assert turns[4].frame is not None and turns[4].heard.shape == (16, 80) and turns[4].said_mel.dtype == np.float16
  for mt in turns:
    p = microturn.positions(mt, c.model.frames_per_position)
    assert len(p) == microturn.num_positions(mt) == layout.sizes[mt.index]
    at = (row["segment_ids"] == 1) & (row["micro_turn"] == mt.index)
    for name in ("kind", "tokens", "dmel", "mel"):
      np.testing.assert_array_equal(getattr(p, name), row[name][at], err_msg=f"micro-turn {mt.index}: {name}")
    rows = row["patch_index"][at]
    np.testing.assert_array_equal(p.patches[p.patch_index[p.patch_index >= 0]], row["patches"][rows[rows >= 0]])


def test_text_only_and_input_only_micro_turns_have_no_audio_or_output_positions():
  mt = microturn.MicroTurn(3, bg_results=[[20, 21]], typed_text=[[30]], said_text=[40, special_id("<eot>")])
  p = microturn.positions(mt, 4)
  assert p.kind.tolist() == [Kind.MT] + [Kind.TEXT_IN] * 7 + [Kind.TEXT_OUT] * 2
  names = ["<mt>", "<bg_result>", 20, 21, "</bg_result>", "<user_text>", 30, "</user_text>", 40, "<eot>"]
  assert p.tokens.tolist() == [special_id(x) if isinstance(x, str) else x for x in names]
  heard = np.ones((16, 80), np.uint8)
  p = microturn.positions(microturn.MicroTurn(0, heard=heard), 4)
  assert p.kind.tolist() == [Kind.MT] + [Kind.AUDIO_IN] * 4 and (p.dmel[1:] == 1).all()
  with pytest.raises(ValueError, match=r"micro-turn 2: field 'heard' is \[15, 80\]; want \[16, 80\]"):
    microturn.positions(microturn.MicroTurn(2, heard=heard[:15]), 4)
