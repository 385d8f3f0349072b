"""`python -m tmlx.eval duplex ...` or `python -m tmlx.eval losses ...` (also `python -m tmlx.eval --checkpoint
...`: losses, as before there were subcommands)."""

import sys

COMMANDS = ("losses", "duplex")


def main(argv: list[str]) -> int:
  if argv and argv[0] in COMMANDS:
    command, argv = argv[0], argv[1:]
  elif not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    command = "losses"
  else:
    print(f"usage: python -m tmlx.eval {{{','.join(COMMANDS)}}} [flags]   (--help after a command for its flags)")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  if command == "duplex":
    from tmlx.eval import duplex

    return duplex.main(argv)
  from tmlx.eval import losses

  return losses.main(argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
