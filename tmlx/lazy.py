"""Package attributes that load their module on first use (PEP 562), for `__init__` files that
re-export names without importing everything at `import`. Imports nothing of the project."""

import importlib
from collections.abc import Callable, Mapping


def exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], list[str]]:
  """(`__getattr__`, `__all__`) of `package`, whose attribute `name` is `names[name]`'s `name`:
  `__getattr__, __all__ = lazy.exports(__name__, {"Session": "tmlx.stream.session"})`."""

  def __getattr__(name: str):
    if name in names:
      return getattr(importlib.import_module(names[name]), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  return __getattr__, sorted(names)
