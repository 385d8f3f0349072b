"""The synthetic source and the Grain pipeline honour the packed-batch contract."""

import numpy as np
import pytest

import data_pipelines
from data_pipelines import ByteTokenizer, Kind, check_batch
from data_pipelines.synthetic import SyntheticSource
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def config():
  c = tiny_config()
  c.data.source = "synthetic"
  return c


def _batches(config, **kw):
  return [batch for batch, _ in data_pipelines.make_dataset(config, **kw)]


def test_rows_are_pure_functions_of_seed_step_row(config):
  a, b = data_pipelines.make_source(config), data_pipelines.make_source(config)
  for key in a.row(3, 5):
    np.testing.assert_array_equal(a.row(3, 5)[key], b.row(3, 5)[key])
  assert not np.array_equal(a.row(3, 5)["tokens"], a.row(3, 6)["tokens"])
  assert not np.array_equal(a.row(3, 5)["tokens"], a.row(4, 5)["tokens"])


def test_pipeline_batches_follow_the_contract(config):
  spec = data_pipelines.row_spec(config)
  batches = _batches(config, start_step=0, num_steps=3, process_index=0, process_count=1)
  assert len(batches) == 3
  for i, batch in enumerate(batches):
    check_batch(batch, spec, config.model.vocab_size, where=f"batch {i}")
    assert batch["tokens"].shape == (config.data.global_batch_size, config.data.seq_len)
    assert (batch["kind"] == Kind.PATCH).any()  # video is exercised
    assert (batch["kind"] == Kind.TEXT_IN).any()  # typed user text is exercised


def test_resume_and_process_split_give_the_same_rows(config):
  full = _batches(config, start_step=0, num_steps=4, process_index=0, process_count=1)
  resumed = _batches(config, start_step=2, num_steps=4, process_index=0, process_count=1)
  halves = [_batches(config, start_step=0, num_steps=4, process_index=p, process_count=2) for p in range(2)]
  for key in full[0]:
    np.testing.assert_array_equal(resumed[0][key], full[2][key])
    for step in range(4):
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(joined, full[step][key])


def test_micro_turn_layout_and_learnable_mapping(config):
  """Every micro-turn is I (MT, [text], [patches], 4 AUDIO_IN) then O (text, <eot>, 4 AUDIO_OUT),
  and the model's words in O_t are the word whose audio pattern the user played in I_t."""
  source: SyntheticSource = data_pipelines.make_source(config)
  tok = ByteTokenizer()
  eot = tok.special("<eot>")
  row = source.row(0, 0)
  kinds, tokens, seg, mt = row["kind"], row["tokens"], row["segment_ids"], row["micro_turn"]
  from data_pipelines import dmel

  expected_dmel = dmel.quantize(source.tables.user_log_mel).astype(float)  # [words, 80]
  n = int((seg > 0).sum())
  assert (seg[n:] == 0).all() and (kinds[n:] == Kind.PAD).all()
  starts = [p for p in range(n) if kinds[p] == Kind.MT]
  for s, e in zip(starts, [*starts[1:], n]):
    k = kinds[s:e]
    assert len(set(seg[s:e])) == 1 and len(set(mt[s:e])) == 1
    audio_in = np.flatnonzero(k == Kind.AUDIO_IN)
    audio_out = np.flatnonzero(k == Kind.AUDIO_OUT)
    text_out = np.flatnonzero(k == Kind.TEXT_OUT)
    assert len(audio_in) == 4 and len(audio_out) == 4
    assert audio_in[-1] < text_out[0] and text_out[-1] < audio_out[0]
    assert tokens[s + text_out[-1]] == eot
    said = list(tokens[s + text_out[:-1]])
    heard = row["dmel"][s + audio_in].astype(float).mean(axis=(0, 1))  # [80]
    # The user's audio matches exactly one word's pattern: the word the model then says.
    distance = np.abs(expected_dmel - heard).mean(axis=1)
    assert source.tables.words[int(np.argmin(distance))] == said
    assert np.sort(distance)[0] < np.sort(distance)[1]


def test_contract_violations_name_the_field(config):
  spec = data_pipelines.row_spec(config)
  batch = _batches(config, start_step=0, num_steps=1, process_index=0, process_count=1)[0]
  bad = dict(batch, tokens=batch["tokens"].copy())
  bad["tokens"][0, 0] = config.model.vocab_size
  with pytest.raises(ValueError, match=r"step 7: field 'tokens' has ids outside \[0, 320\)"):
    check_batch(bad, spec, config.model.vocab_size, where="step 7")
  bad = dict(batch, mel=batch["mel"].astype(np.float32))
  with pytest.raises(ValueError, match="field 'mel' is float32"):
    check_batch(bad, spec, config.model.vocab_size, where="step 7")
