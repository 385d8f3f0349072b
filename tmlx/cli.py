"""What the absl command lines of tmlx and data_pipelines share: errors in one line naming what
was wrong, not a traceback, and one way to write a command.

A command is two functions: `define(flag_values)` defines its flags and `run(flag_values, args)`
does its work from their values and the positional `args`, returning the exit status; `run` calls
an importable function that does the work. `app_main` runs a command as `python -m` does, through
`absl.app.run` with its flags on absl's FLAGS (so `--help`, `--helpfull`, `--flagfile` and absl's
logging flags work too). `call` runs it in-process on a fresh FlagValues, so that a test can run a
command as often as it likes with no flag kept from an earlier call, next to other modules' flags
of the same names. Flags are defined when a command runs, never at import, so that modules that
are also libraries define no flags when imported.

A bad command line (an unknown or malformed flag, a missing required one, a wrong positional
argument) ends in one line on stderr, `PROG: error: ...`, with exit status 2, and so does a bad
input that the work finds (a path that is missing, a value out of range) when `run` does it inside
`one_line_exits`. A command whose arguments after `--` belong to another program (a launcher) is run
with `passthrough`. The commands whose `--config` is an experiment file (`tmlx.main`, `tmlx.plan`,
`data_pipelines.inspect`) define ml_collections' config flag on absl's FLAGS instead, and parse with
`parse_flags` and `load_config`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags


def one_line(e: BaseException) -> str:
  """An exception's message in one line (a ConfigDict's wrapped KeyError unwrapped)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split()) or type(e).__name__


def parse_flags(argv):
  """absl's flag parsing (pass as `app.run(main, flags_parser=parse_flags)`), with a bad config
  override (an unknown field, a value of the wrong type) or an experiment file that refused its
  argument (`--config=FILE:ARG`) reported in one line: the innermost error, not the traceback
  text that config_flags wraps around it."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
      inner = inner.__cause__ or inner.__context__
    named = "" if isinstance(inner, (flags.Error, ValueError, KeyError)) else f"{type(inner).__name__}: "
    sys.exit(f"invalid flags: {named}{one_line(inner)}")
  except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    sys.exit(f"invalid flags: {one_line(e)}")


def load_config(flag) -> ml_collections.ConfigDict:
  """The value of a DEFINE_config_file flag; exits in one line when its file is missing or fails
  to build its config (config_flags defers that error to the first use of the value)."""
  try:
    config = flag.value
    config.keys()
    return config
  except Exception as e:
    path = config_flags.get_config_filename(flags.FLAGS[flag.name])
    sys.exit(f"invalid --config={path}: {one_line(e.__cause__ or e) if os.path.isfile(path) else 'no such file'}")


Define = Callable[[flags.FlagValues], None]
Run = Callable[[flags.FlagValues, list[str]], int]


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
  """Ends the command with `PROG: error: MESSAGE` in one line on stderr."""
  print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


def parse(prog: str, argv: Sequence[str], flag_values: flags.FlagValues, *, passthrough: bool = False) -> list[str]:
  """Parses `argv` (the program name first) into `flag_values`; returns the positional arguments
  after the program name. absl stops at `--` and drops it; with `passthrough` the arguments after
  the first `--` are not parsed and come back after the positional ones behind that `--`, so that
  `run` can tell them apart."""
  argv, rest = list(argv), None
  if passthrough and "--" in argv[1:]:
    cut = argv.index("--", 1)
    argv, rest = argv[:cut], argv[cut:]
  try:
    args = flag_values(argv)[1:]
  except flags.Error as e:
    fail(prog, one_line(e))
  return args if rest is None else [*args, *rest]


@contextlib.contextmanager
def one_line_exits(prog: str) -> Iterator[None]:
  """Inside the block, `SystemExit("message")`, which the work raises for a bad input it finds
  (naming the flag that gave it), ends the command as `fail(prog, message)`; an exit with a
  status (`SystemExit(1)`) passes through as it is."""
  try:
    yield
  except SystemExit as e:
    if isinstance(e.code, str):
      fail(prog, e.code)
    raise


def call(prog: str, define: Define, run: Run, argv: Sequence[str] | None = None, *, passthrough: bool = False) -> int:
  """Runs the command on `argv` (the arguments after the program name; default sys.argv[1:]) in
  this process, with flags of its own; returns its exit status. `passthrough`: as in `parse`."""
  flag_values = flags.FlagValues()
  define(flag_values)
  argv = [prog, *(sys.argv[1:] if argv is None else argv)]
  return run(flag_values, parse(prog, argv, flag_values, passthrough=passthrough))


def app_main(
  prog: str, define: Define, run: Run, argv: Sequence[str] | None = None, *, passthrough: bool = False
) -> NoReturn:
  """The command as `python -m` runs it: `absl.app.run`, the flags on absl's FLAGS (`--help` lists
  them, under the `__main__` module's docstring), `run`'s status the exit status. `argv`: the
  command line, program first (default sys.argv; a dispatcher passes it without its subcommand);
  `passthrough`: as in `parse`."""

  def flags_parser(argv: list[str]) -> list[str]:
    known = set(flags.FLAGS)
    define(flags.FLAGS)
    for name in sorted(set(flags.FLAGS) - known):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    return parse(prog, argv, flags.FLAGS, passthrough=passthrough)

  app.run(lambda args: run(flags.FLAGS, args), argv=None if argv is None else list(argv), flags_parser=flags_parser)
