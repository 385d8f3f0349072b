"""Stems, heads, the attention mask, and causality of the whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.contract import Kind
from tests.helpers import synthetic_batch, tiny_config, tiny_model
from tmlx.nn.attention import attention_mask


@pytest.fixture(scope="module")
def setup():
  config = tiny_config("tiny")
  return tiny_model(), synthetic_batch(config, rows=2), config


def test_stem_and_head_shapes(setup):
  model, batch, config = setup
  b, s = batch["tokens"].shape
  d, v = model.cfg.d_model, model.cfg.vocab_size
  f = model.cfg.frames_per_position
  p = config.data.max_patches
  assert model.text_embed(batch["tokens"]).shape == (b, s, d)
  assert model.dmel_embed(batch["dmel"]).shape == (b, s, d)
  assert model.video_stem(batch["patches"], batch["patch_rowcol"]).shape == (b, p, d)
  assert model.embed(batch).shape == (b, s, d)
  out = nnx.jit(lambda m, x: m(x))(model, batch)
  assert out.hidden.shape == (b, s, d)
  assert out.moe.expert_load.shape == (model.cfg.num_layers, model.cfg.moe.num_experts)
  assert model.text_logits(out.hidden[:, :5]).shape == (b, 5, v)
  assert model.text_logits(out.hidden).dtype == jnp.float32
  h = out.hidden.reshape(b * s, d)[:7]
  v_pred = model.flow_head(jnp.zeros((7, f * 80)), jnp.full((7,), 0.5), h)
  assert v_pred.shape == (7, f * 80)


def test_flow_sampler_shape_and_range(setup):
  from tmlx.nn.flow_head import sample

  model, batch, _ = setup
  h = jax.random.normal(jax.random.key(1), (3, model.cfg.d_model))
  x = nnx.jit(lambda head, h: sample(head, h, jax.random.key(0), steps=4))(model.flow_head, h)
  assert x.shape == (3, model.cfg.mel_dim)
  assert float(jnp.max(jnp.abs(x))) <= 1.0


def test_mask_sees_no_future_and_no_other_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  mask = np.asarray(attention_mask(seg))
  for b in range(seg.shape[0]):
    for q in range(seg.shape[1]):
      for k in range(seg.shape[1]):
        allowed = k <= q and seg[b, q] == seg[b, k] and seg[b, q] > 0
        assert mask[b, q, k] == allowed, (b, q, k)


def test_model_is_causal_and_segment_isolated(setup):
  """Changing a position's inputs changes no hidden state before it or in other segments."""
  model, batch, _ = setup
  forward = nnx.jit(lambda m, b: m(b).hidden[0])
  row = {k: v[:1] for k, v in batch.items()}
  seg = np.asarray(row["segment_ids"][0])
  assert seg.max() >= 2, "the synthetic row should pack at least two segments"
  first_seg_end = int(np.argmax(seg != seg[0]))  # first position of segment 2
  p = first_seg_end + 3  # a position inside segment 2
  changed = dict(row)
  changed["tokens"] = row["tokens"].at[0, p:].set(17)
  changed["dmel"] = row["dmel"].at[0, p:].set(3)
  changed["kind"] = row["kind"].at[0, p:].set(int(Kind.TEXT_IN))
  changed["kind"] = jnp.where(row["segment_ids"] == 0, 0, changed["kind"]).astype(jnp.int8)
  h0, h1 = forward(model, row), forward(model, changed)
  np.testing.assert_allclose(h0[:p], h1[:p], atol=1e-5)
  assert float(jnp.max(jnp.abs(h0[p:] - h1[p:]))) > 1e-3
  # Segment 1 alone gives the same hidden states as segment 1 packed with others.
  alone = {k: v for k, v in row.items()}
  alone["segment_ids"] = jnp.where(row["segment_ids"] == seg[0], row["segment_ids"], 0)
  h2 = forward(model, alone)
  np.testing.assert_allclose(h0[:first_seg_end], h2[:first_seg_end], atol=1e-5)
