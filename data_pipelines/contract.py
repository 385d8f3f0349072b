"""The packed-batch contract between data_pipelines and tmlx (MODEL_SPEC.md §8), and the format
constants every producer and consumer of rows shares (time, mel features, patches, special tokens).

One row holds S positions; a batch adds a leading B. Letters: S sequence, F dMel frames per
audio position, P patches per row.

| field          | shape, dtype            | meaning                                            |
|----------------|-------------------------|----------------------------------------------------|
| `tokens`       | [S] int32               | text/special id at text and MT positions, 0 else   |
| `kind`         | [S] int8                | a `Kind`                                           |
| `dmel`         | [S, F, 80] uint8        | dMel bins at audio positions                       |
| `mel`          | [S, F, 80] float16      | normalized log-mel at AUDIO_OUT positions          |
| `patch_index`  | [S] int32               | index into `patches` at PATCH positions, -1 else   |
| `patches`      | [P, 40, 40, 3] uint8    | the row's video patches                            |
| `patch_rowcol` | [P, 2] int16            | grid (row, col) of each patch                      |
| `segment_ids`  | [S] int32               | 0 for padding, 1.. per packed episode window       |
| `positions`    | [S] int32               | position within the segment                        |
| `micro_turn`   | [S] int32               | absolute micro-turn index within the episode       |
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

# Time: 16 kHz mono audio in 200 ms micro-turns (MODEL_SPEC.md §1-§3).
SAMPLE_RATE = 16_000
MICRO_TURN_SECONDS = 0.2
SAMPLES_PER_MICRO_TURN = 3200  # SAMPLE_RATE * MICRO_TURN_SECONDS
FRAMES_PER_MICRO_TURN = 16  # dMel frames of 12.5 ms (a 200-sample hop, `data_pipelines.dmel`)
AUDIO_POSITIONS_PER_MICRO_TURN = 4  # per stream: AUDIO_IN x 4 in I_t, AUDIO_OUT x 4 in O_t

# Mel features (MODEL_SPEC.md §2): 80 log10-mel channels; dMel bins centred at LOG_MEL_MIN + BIN_WIDTH·i;
# the flow head's target is (clip(log_mel, LOG_MEL_MIN, LOG_MEL_MAX) + MEL_NORM_OFFSET) / MEL_NORM_SCALE.
NUM_MELS = 80
NUM_DMEL_BINS = 16
LOG_MEL_MIN = -7.0
LOG_MEL_MAX = 2.0
BIN_WIDTH = 0.6
MEL_NORM_OFFSET = 2.5  # maps [-7, 2] onto [-1, 1]
MEL_NORM_SCALE = 4.5

PATCH_SIZE = 40  # video patches are PATCH_SIZE x PATCH_SIZE RGB pixels

# Text: ids 0..NUM_RESERVED-1 are special in every tokenizer (PAD first, so that 0 means "no token";
# ids past the named ones are held for future specials without renumbering the rest).
SPECIAL_TOKENS = (
  "<pad>",
  "<mt>",
  "<eot>",
  "<user_text>",
  "</user_text>",
  "<bg_call>",
  "</bg_call>",
  "<bg_result>",
  "</bg_result>",
)
NUM_RESERVED = 16


def special_id(name: str) -> int:
  """The id of special token `name` (one of SPECIAL_TOKENS), the same in every tokenizer."""
  try:
    return SPECIAL_TOKENS.index(name)
  except ValueError:
    raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None


class Kind(enum.IntEnum):
  """What a sequence position holds."""

  PAD = 0
  MT = 1
  TEXT_IN = 2
  TEXT_OUT = 3
  AUDIO_IN = 4
  AUDIO_OUT = 5
  PATCH = 6


NUM_KINDS = len(Kind)


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """Static sizes of one packed row."""

  seq_len: int
  frames_per_position: int
  max_patches: int

  def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every field of one row."""
    s, f, p = self.seq_len, self.frames_per_position, self.max_patches
    return {
      "tokens": ((s,), np.dtype(np.int32)),
      "kind": ((s,), np.dtype(np.int8)),
      "dmel": ((s, f, NUM_MELS), np.dtype(np.uint8)),
      "mel": ((s, f, NUM_MELS), np.dtype(np.float16)),
      "patch_index": ((s,), np.dtype(np.int32)),
      "patches": ((p, PATCH_SIZE, PATCH_SIZE, 3), np.dtype(np.uint8)),
      "patch_rowcol": ((p, 2), np.dtype(np.int16)),
      "segment_ids": ((s,), np.dtype(np.int32)),
      "positions": ((s,), np.dtype(np.int32)),
      "micro_turn": ((s,), np.dtype(np.int32)),
    }

  def empty_row(self) -> dict[str, np.ndarray]:
    """An all-padding row."""
    row = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.fields().items()}
    row["patch_index"][:] = -1
    return row


def patches_per_frame(frame_height: int, frame_width: int) -> int:
  """Whole 40x40 patches in a frame."""
  return (frame_height // PATCH_SIZE) * (frame_width // PATCH_SIZE)


def min_positions_per_micro_turn(patches_per_frame: int) -> int:
  """Smallest micro-turn: <mt>, a frame's patches, AUDIO_IN x4, <eot>, AUDIO_OUT x4."""
  return 1 + patches_per_frame + 2 * AUDIO_POSITIONS_PER_MICRO_TURN + 1


def check_batch(batch: dict[str, np.ndarray], spec: RowSpec, vocab_size: int, where: str) -> None:
  """Raises ValueError naming `where` and the field if `batch` breaks the contract."""
  expected = spec.fields()
  missing = sorted(set(expected) - set(batch))
  extra = sorted(set(batch) - set(expected))
  if missing or extra:
    raise ValueError(f"{where}: batch fields differ from the contract: missing {missing}, unexpected {extra}")
  lead = None
  for name, (shape, dtype) in expected.items():
    arr = batch[name]
    if lead is None:
      lead = arr.shape[: arr.ndim - len(shape)]
    if arr.dtype != dtype or arr.shape != (*lead, *shape):
      raise ValueError(
        f"{where}: field {name!r} is {arr.dtype}{list(arr.shape)}, the contract wants {dtype}{[*lead, *shape]}"
      )
  if batch["kind"].min() < 0 or batch["kind"].max() >= NUM_KINDS:
    raise ValueError(f"{where}: field 'kind' has values outside [0, {NUM_KINDS})")
  if batch["tokens"].min() < 0 or batch["tokens"].max() >= vocab_size:
    raise ValueError(f"{where}: field 'tokens' has ids outside [0, {vocab_size}) (model.vocab_size)")
  if batch["dmel"].max() >= NUM_DMEL_BINS:
    raise ValueError(f"{where}: field 'dmel' has bins >= {NUM_DMEL_BINS}")
  if batch["patch_index"].max() >= spec.max_patches:
    raise ValueError(f"{where}: field 'patch_index' points past data.max_patches={spec.max_patches}")
