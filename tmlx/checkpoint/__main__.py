"""python -m tmlx.checkpoint inspect PATH [--step=N] [--verify]

Prints what a checkpoint directory (or a workdir) holds: its steps, the resolved config of one
step, its arrays with their saved shardings and, with --verify, whether every array matches its
fingerprint (exit status 1 when one does not).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from tmlx import cli
from tmlx.checkpoint.report import inspect

PROG = "python -m tmlx.checkpoint"
USAGE = f"{PROG} inspect PATH [--step=N] [--verify]"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("step", None, "Step to inspect (default: the latest).", flag_values=fv)
  flags.DEFINE_bool("verify", False, "Restore every array and check its fingerprint.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """`inspect`s the checkpoint the parsed command line names; a missing one ends it in one line."""
  if len(args) != 2 or args[0] != "inspect":
    cli.fail(PROG, f"expected: {USAGE}; got {' '.join(args) or 'no arguments'}")
  try:
    inspect(args[1], fv.step, fv.verify)
  except FileNotFoundError as e:
    cli.fail(PROG, str(e))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.checkpoint ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run)
