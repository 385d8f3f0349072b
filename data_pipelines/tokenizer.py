"""Text tokenizers behind one interface (MODEL_SPEC.md §2, Text).

The byte-level tokenizer needs no training and is the embedded default: ids 0..15 are the special
tokens (PAD first, so that 0 means "no token"), ids 16..271 are the 256 byte values.
"""

from __future__ import annotations

from typing import Protocol

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
NUM_RESERVED = 16  # room for future specials without renumbering bytes


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...

  def special(self, name: str) -> int: ...


class ByteTokenizer:
  """UTF-8 bytes offset by the reserved special ids."""

  vocab_size = NUM_RESERVED + 256

  def encode(self, text: str) -> list[int]:
    return [NUM_RESERVED + b for b in text.encode("utf-8")]

  def decode(self, ids: list[int]) -> str:
    out = bytearray()
    for i in ids:
      if i >= NUM_RESERVED:
        out.append(i - NUM_RESERVED)
      elif i != 0:
        out.extend(SPECIAL_TOKENS[i].encode())
    return out.decode("utf-8", errors="replace")

  def special(self, name: str) -> int:
    try:
      return SPECIAL_TOKENS.index(name)
    except ValueError:
      raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None
