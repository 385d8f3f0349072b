"""Checks for the fields of config dataclasses, called from their `__post_init__`, and `build`,
which makes a dataclass from a group of an experiment config.

A bad value raises FieldError. Its message names fields as `@name`: `build` puts the group's
path before them (`@moe.num_experts`), and `tmlx.config.validate` the config's (`config.model.`),
so an error says which field of which file to change; raised elsewhere, `str()` shows the bare
names. A value shown in a message goes through `shown`, which doubles any `@` in it (a literal
`@`). Modes are `Literal` types, checked by `literals`. No JAX here: the checks run at start-up.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping

_MARK = re.compile("@@|@")


class FieldError(ValueError):
  """A bad field value; `template` is the message with `@` where the field's path goes (and `@@`
  for a literal `@`)."""

  def __init__(self, template: str):
    self.template = template
    super().__init__(_MARK.sub(lambda m: "@" if m[0] == "@@" else "", template))

  def at(self, prefix: str) -> FieldError:
    """The same error with `prefix` ('moe.', 'config.model.') before every field name."""
    return FieldError(_MARK.sub(lambda m: m[0] if m[0] == "@@" else "@" + prefix, self.template))


def shown(value) -> str:
  """`repr(value)` for a FieldError template (its `@`s doubled, so they are not field marks)."""
  return repr(value).replace("@", "@@")


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def choices(cls, name: str) -> tuple:
  """The values a Literal-typed field of dataclass `cls` may take."""
  return typing.get_args(_hints(cls)[name])


def literals(obj) -> None:
  """Every Literal-typed field of dataclass `obj` holds one of its values."""
  for name, hint in _hints(type(obj)).items():
    if typing.get_origin(hint) is typing.Literal and getattr(obj, name) not in typing.get_args(hint):
      raise FieldError(f"@{name}={shown(getattr(obj, name))}: expected one of {typing.get_args(hint)}")


def positive(obj, *names: str) -> None:
  """Each field in `names` is > 0."""
  for name in names:
    if not getattr(obj, name) > 0:
      raise FieldError(f"@{name}={getattr(obj, name)}: must be > 0")


def in_range(obj, name: str, low: float, high: float = math.inf, *, high_open: bool = False) -> None:
  """Field `name` is in [low, high] ([low, high) with `high_open`)."""
  value = getattr(obj, name)
  if not (low <= value < high if high_open else low <= value <= high):
    raise FieldError(f"@{name}={value}: must be in [{low}, {high}{')' if high_open else ']'}")


def build(cls, group: Mapping, prefix: str = ""):
  """`cls` from the same-named fields of `group` (a ConfigDict or dict), nested dataclass fields
  from the same-named subgroups; a FieldError names the field under `prefix`."""
  hints = _hints(cls)
  try:
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in group:
        nested = dataclasses.is_dataclass(hints[f.name])
        kwargs[f.name] = build(hints[f.name], group[f.name], f"{f.name}.") if nested else group[f.name]
    return cls(**kwargs)
  except FieldError as e:
    raise e.at(prefix) from None
