"""SLURM's compressed notations: host lists ("node[001-003,007]") and task counts ("4(x2),2")."""

from __future__ import annotations

import re

_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def expand_hostlist(expr: str) -> list[str]:
  """The host names of a SLURM hostlist expression, in order.

  "node[001-003,007],gpu-a[1-2]" -> node001 node002 node003 node007 gpu-a1 gpu-a2: a range keeps the
  zero padding of its lower bound, and several bracket groups in one name expand as a product
  ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2). Raises ValueError for a malformed expression.
  """
  names, depth, start = [], 0, 0
  for i, ch in enumerate(expr + ","):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    elif ch == "," and depth == 0:
      names.append(expr[start:i].strip())
      start = i + 1
    if depth not in (0, 1):
      raise ValueError(f"unbalanced or nested brackets in hostlist {expr!r}")
  if depth or not all(names):
    raise ValueError(f"malformed hostlist {expr!r} (unclosed bracket or empty name)")
  return [host for name in names for host in _expand_name(name, expr)]


def _expand_name(name: str, expr: str) -> list[str]:
  open_at = name.find("[")
  if open_at < 0:
    if "]" in name:
      raise ValueError(f"unbalanced brackets in hostlist {expr!r}")
    return [name]
  close_at = name.index("]", open_at)
  prefix, ranges, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
  values = []
  for part in ranges.split(","):
    m = _RANGE.fullmatch(part.strip())
    if not m or (m[2] is not None and int(m[2]) < int(m[1])):
      raise ValueError(f"bad range {part!r} in hostlist {expr!r} (expected N or LO-HI with LO <= HI)")
    lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
    values += [str(n).zfill(len(m[1])) for n in range(lo, hi + 1)]
  return [prefix + value + tail for value in values for tail in _expand_name(rest, expr)]


_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def expand_counts(expr: str) -> list[int]:
  """Per-node task counts of SLURM's compressed form: "4(x2),2" -> [4, 4, 2]. ValueError if malformed."""
  counts = []
  for part in expr.split(","):
    m = _COUNT.fullmatch(part.strip())
    if not m:
      raise ValueError(f"bad task count {part!r} in {expr!r} (expected N or N(xR))")
    counts += [int(m[1])] * int(m[2] or 1)
  return counts
