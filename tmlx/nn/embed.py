"""Input stems: text embedding, dMel bag of embeddings, hMLP video stem (MODEL_SPEC.md §2).

Dimensions:
  B  batch
  D  model width
  M  mel channels (80)
  P  video patches of a row
  Q  dMel bins (16)
  R  rows of a flattened matmul: several dimensions folded into one; here B·S
  S  query positions
  V  vocabulary
  W  dMel frames per audio position
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Integer, UInt8

from data_pipelines.contract import NUM_DMEL_BINS, NUM_MELS
from tmlx.nn.common import Dense, Dtypes, RMSNorm, fan_in_init, lookup, param


class TextEmbed(nnx.Module):
  """Token ids [B, S] → [B, S, D], rows of a [V, D] table."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtypes: Dtypes):
    self.dtypes = dtypes
    self.table = param(rngs, fan_in_init(0), (vocab_size, d_model), ("vocab", "embed"), dtypes.param)

  def __call__(self, tokens: Integer[Array, "B S"]) -> Float[Array, "B S D"]:
    return lookup(self.table[...], tokens, "vocab").astype(self.dtypes.compute)


class DmelBagEmbed(nnx.Module):
  """dMel bins [B, S, W, M] → [B, S, D]: sum of E_bag[w, m, bin] over the W×M cells, then a norm.

  The sum is written as a one-hot contraction, one matmul of [R, W·M·Q] × [W·M·Q, D] with R = B·S.
  """

  def __init__(self, frames: int, d_model: int, *, rngs: nnx.Rngs, dtypes: Dtypes, eps: float):
    self.dtypes = dtypes
    scale = (frames * NUM_MELS) ** -0.5
    self.table = param(
      rngs,
      lambda k, s, d: (scale * jax.random.normal(k, s)).astype(d),
      (frames, NUM_MELS, NUM_DMEL_BINS, d_model),
      ("stem", "stem", "stem", "embed"),
      dtypes.param,
    )
    self.norm = RMSNorm(d_model, rngs=rngs, dtypes=dtypes, eps=eps)

  def __call__(self, dmel: Integer[Array, "B S W M=80"]) -> Float[Array, "B S D"]:
    dt = self.dtypes.compute
    onehot = jax.nn.one_hot(dmel, NUM_DMEL_BINS, dtype=dt)  # [B, S, W, M, Q]
    # [B, S, W, M, Q] · [W, M, Q, D] → [B, S, D], contracted in the order W, M, Q. (An einsum
    # contracts its letters in alphabetical order, which in these letters would be M, Q, W.)
    table = self.table[...].astype(dt)
    return self.norm(jax.lax.dot_general(onehot, table, (((2, 3, 4), (0, 1, 2)), ((), ()))))


class HMLPStem(nnx.Module):
  """40x40 RGB patches [B, P, 40, 40, 3] uint8 + grid (row, col) [B, P, 2] → [B, P, D].

  hMLP (Touvron et al. 2022) adapted to 40 px: per-patch stages with kernel = stride 4, 2, 5
  (widths `width`, `width`, D), a norm after each stage and GELU between them, written as
  reshapes + dense layers; then learned row and column embeddings of the patch's place in the
  frame.
  """

  def __init__(
    self, d_model: int, width: int, max_rows: int, max_cols: int, *, rngs: nnx.Rngs, dtypes: Dtypes, eps: float
  ):
    self.dtypes = dtypes
    self.stage1 = Dense(4 * 4 * 3, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.norm1 = RMSNorm(width, rngs=rngs, dtypes=dtypes, eps=eps)
    self.stage2 = Dense(2 * 2 * width, width, ("stem", "stem"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.norm2 = RMSNorm(width, rngs=rngs, dtypes=dtypes, eps=eps)
    self.stage3 = Dense(5 * 5 * width, d_model, ("stem", "embed"), rngs=rngs, dtypes=dtypes, use_bias=True)
    self.norm3 = RMSNorm(d_model, rngs=rngs, dtypes=dtypes, eps=eps)
    self.row_embed = param(rngs, fan_in_init(0), (max_rows, d_model), ("stem", "embed"), dtypes.param)
    self.col_embed = param(rngs, fan_in_init(0), (max_cols, d_model), ("stem", "embed"), dtypes.param)

  def __call__(self, patches: UInt8[Array, "B P 40 40 3"], rowcol: Integer[Array, "B P 2"]) -> Float[Array, "B P D"]:
    b, p = patches.shape[:2]
    x = patches.astype(self.dtypes.compute) / 127.5 - 1.0
    # Stage 1: 4x4 pixel cells of a 10x10 grid.
    x = x.reshape(b, p, 10, 4, 10, 4, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, p, 10, 10, 48)
    x = jax.nn.gelu(self.norm1(self.stage1(x)))
    # Stage 2: 2x2 cells of the 10x10 grid → 5x5.
    width = x.shape[-1]
    x = x.reshape(b, p, 5, 2, 5, 2, width).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, p, 5, 5, 4 * width)
    x = jax.nn.gelu(self.norm2(self.stage2(x)))
    # Stage 3: the whole 5x5 grid → one vector.
    x = self.norm3(self.stage3(x.reshape(b, p, 25 * width)))
    rows = lookup(self.row_embed[...], rowcol[..., 0].astype(jnp.int32), "stem")
    cols = lookup(self.col_embed[...], rowcol[..., 1].astype(jnp.int32), "stem")
    return x + (rows + cols).astype(self.dtypes.compute)
