"""python -m tmlx.eval losses|duplex [flags]   (--help after a command for its flags)

`python -m tmlx.eval --checkpoint ...`, with flags but no command, is `losses`, as before there
were commands.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from tmlx import cli

PROG = "python -m tmlx.eval"
COMMANDS = ("losses", "duplex")  # each a module of tmlx.eval with PROG, define_flags and run
HELP = ("-h", "--help")


def command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """The command a command line (its arguments after PROG) names and the arguments that are its
  own; None for a request for help. Ends in one line if it names no command."""
  if argv and argv[0] in COMMANDS:
    return argv[0], list(argv[1:])
  if argv and argv[0] in HELP:
    return None, []
  if not argv or argv[0].startswith("-"):
    return "losses", list(argv)
  cli.fail(PROG, f"the first argument is the command, one of {', '.join(COMMANDS)}; got {argv[0]!r}")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.eval ARGS` in this process on `argv` (ARGS; default sys.argv[1:]);
  returns the exit status."""
  name, args = command(sys.argv[1:] if argv is None else argv)
  if name is None:
    print(__doc__)
    return 0
  module = importlib.import_module(f"tmlx.eval.{name}")
  return cli.call(module.PROG, module.define_flags, module.run, args)


if __name__ == "__main__":
  name, args = command(sys.argv[1:])
  if name is None:
    print(__doc__)
    sys.exit(0)
  module = importlib.import_module(f"tmlx.eval.{name}")
  __doc__ = module.__doc__  # what --help prints
  cli.app_main(module.PROG, module.define_flags, module.run, [sys.argv[0], *args])
