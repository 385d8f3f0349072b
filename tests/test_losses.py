"""Losses: gathered targets equal the all-positions computation; accumulation equals one batch."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines import Kind
from tests.helpers import synthetic_batch, tiny_config, tiny_model
from tmlx import sharding, train
from tmlx.losses import audio_targets, loss_config, loss_sums, text_target_weights
from tmlx.state import state_spec


def test_gathered_text_loss_equals_masked_full_loss():
  config = tiny_config("tiny")
  config.loss.silent_eot_weight = 0.5
  model = tiny_model()
  batch = synthetic_batch(config, rows=2)
  lc = loss_config(config)

  @nnx.jit
  def both(model, batch):
    out = model(batch)
    sums = loss_sums(model, out, batch, jax.random.key(0), lc)
    logits = model.text_logits(out.hidden)  # every position
    return sums, logits, out.hidden

  sums, logits, _ = both(model, batch)
  kind, seg, tok = (np.asarray(batch[k]) for k in ("kind", "segment_ids", "tokens"))
  logp = np.asarray(jax.nn.log_softmax(logits))
  total, weight = 0.0, 0.0
  for b in range(kind.shape[0]):
    for p in range(kind.shape[1] - 1):
      if kind[b, p + 1] == Kind.TEXT_OUT and seg[b, p + 1] == seg[b, p] > 0:
        w = 0.5 if tok[b, p + 1] == lc.eot_id and kind[b, p] != Kind.TEXT_OUT else 1.0
        total += -w * logp[b, p, tok[b, p + 1]]
        weight += w
  np.testing.assert_allclose(float(sums.text_weight), weight, rtol=1e-6)
  np.testing.assert_allclose(float(sums.text_sum), total, rtol=1e-4)
  n_audio = sum(
    1
    for b in range(kind.shape[0])
    for p in range(kind.shape[1] - 1)
    if kind[b, p + 1] == Kind.AUDIO_OUT and seg[b, p + 1] == seg[b, p] > 0
  )
  assert float(sums.flow_count) == n_audio
  assert float(sums.text_overflow) == 0 and float(sums.audio_overflow) == 0


def test_gradient_accumulation_equals_the_full_batch():
  """Two micro-batches give the same update as one batch (losses normalized by the global count)."""
  config = tiny_config("tiny")
  config.model.compute_dtype = "float32"
  config.loss.flow_weight = 0.0  # flow draws differ per micro-batch; text is exact
  config.model.moe.load_balance_weight = 0.0  # batch statistics: not additive over micro-batches
  config.model.moe.z_loss_weight = 0.0
  # Adam with a large epsilon moves each parameter by ~lr·g: differences in the gradients show
  # up in the parameters unamplified (a small epsilon turns tiny gradients into ±lr steps).
  config.optimizer.eps = 1.0
  config.optimizer.weight_decay = 0.0
  config.model.moe.bias_update_rate = 0.01  # the balancing biases move after the step
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  state = jax.jit(spec.init, out_shardings=spec.shardings)()
  batch = synthetic_batch(config)
  results = []
  for n in (1, 2):
    config.optimizer.grad_accum_steps = n
    sc = train.step_config(config, spec, mesh, rules)
    results.append(jax.jit(functools.partial(train.train_step, sc=sc))(state, batch))
  (s1, m1), (s2, m2) = results
  np.testing.assert_allclose(m1["text_loss"], m2["text_loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert int(s2.step) == 1
  # Aux-loss-free balancing: every layer's bias moved by ±rate, against that layer's load.
  bias = np.asarray(s1.model_state["blocks"]["moe"]["router_bias"])
  np.testing.assert_array_equal(bias, np.asarray(s2.model_state["blocks"]["moe"]["router_bias"]))
  load = np.asarray(m1["moe/expert_load"])
  np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean(axis=-1, keepdims=True) - load), rtol=1e-6)
  assert np.abs(bias).max() == pytest.approx(0.01)
  before, after = state.params["blocks"], s1.params["blocks"]
  moved = [bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  assert all(moved), "every decoder parameter should move in one step"


def test_burn_in_leaves_out_the_first_micro_turns_of_windows_cut_from_mid_conversation():
  config = tiny_config("tiny")
  batch = {k: np.array(v) for k, v in synthetic_batch(config, rows=2).items()}
  # Row 0's first window starts a conversation (micro-turn 0); every other window starts mid-way.
  mt, seg = batch["micro_turn"], batch["segment_ids"]
  first = seg[0] == 1
  batch["micro_turn"][0, first] = mt[0, first] - mt[0, first].min()
  lc = dataclasses.replace(loss_config(config), burn_in=2)
  weights, _ = text_target_weights(batch, lc)
  audio, _ = audio_targets(batch, lc)
  none, _ = text_target_weights(batch, dataclasses.replace(lc, burn_in=0))
  for b in range(2):
    for p in range(batch["kind"].shape[1] - 1):
      s = seg[b, p + 1]
      start = batch["micro_turn"][b][seg[b] == s].min() if s else 0
      known = start == 0 or batch["micro_turn"][b, p + 1] - start >= 2
      assert float(weights[b, p]) == (float(none[b, p]) if known else 0.0), (b, p)
      if not known:
        assert not bool(audio[b, p])
  assert float(weights[0, first].sum()) == float(none[0, first].sum()) > 0  # the conversation's start: all
  assert float(weights.sum()) < float(none.sum())
