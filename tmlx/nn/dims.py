"""The dimension legend of tmlx: one letter per dimension, one meaning per letter, in every file.

Dimensions:
  A  routed assignments of a row, J·S (choice j of token s is assignment j·S + s)
  B  batch
  C  capacity: buffer slots per expert and row
  D  model width
  E  experts
  F  expert hidden width
  G  query heads per kv head, N / K
  H  head dim
  I  input features of a generic layer
  J  experts chosen per token (top-k)
  K  kv heads
  L  layers
  M  mel channels (80)
  N  query heads
  O  output features of a generic layer
  P  video patches of a row
  Q  dMel bins (16)
  R  rows of a flattened matmul: several dimensions folded into one
  S  query positions
  T  key positions (KV-cache slots when decoding)
  U  flow-head width
  V  vocabulary
  W  dMel frames per audio position
  X  expert shards: the size of the mesh's expert axis
  Y  flow-target values per position (W·M for the audio head)
  Z  flow-matching draws of (t, x0) per target

How the letters are written:
- Each `tmlx/nn` file's docstring repeats, in the same layout, the lines of the letters it uses;
  a line may add a note after "; " (for R: which dimensions are folded). A letter that only one
  file needs may instead be declared there with "(local)" at the end of its line, and then no
  other file may use that letter for anything else.
- Shape comments and docstrings write shapes in these letters, `[B, S, D]`; a product is written
  with a dot, `[B, E·C]`; there a lowercase letter is one shard's part of a dimension inside
  `jax.shard_map` (`b` of B, `e` = E / X experts of one shard).
- `jnp.einsum` subscripts are the same letters in lower case: `"bsd,de->bse"`.
- Public signatures carry jaxtyping annotations in the same letters, `Float[Array, "B S D"]`,
  with jaxtyping's syntax for the rest: `*lead` the leading dimensions that pass through a call
  (the same in each argument; `*#lead` where size 1 broadcasts), `...` any leading dimensions,
  `_` one dimension of any size, `M=80` a fixed size under its letter, `H//2` a size computed from
  letters bound by earlier arguments. The tests run them under jaxtyping's import hook with
  beartype (tests/test_shapes.py); outside it they cost nothing.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^  ([A-Z])  (.+)$", re.M)


def parse_legend(doc: str) -> dict[str, str]:
  """The letter → meaning lines of a docstring's `Dimensions:` block (this module's layout)."""
  _, _, rest = doc.partition("\nDimensions:\n")
  if not rest:
    return {}
  block = rest.split("\n\n", 1)[0]
  return dict(_LINE.findall(block))


LEGEND: dict[str, str] = parse_legend(__doc__)
