"""The command line of `python -m data_pipelines.sample_corpus --out=DIR` (flags in the package
docstring): its flags, and `main`, which runs it in-process."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from data_pipelines.sample_corpus.corpus import generate
from tmlx import cli

PROG = "python -m data_pipelines.sample_corpus"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "out",
    None,
    "Directory (or gs:// URL) for the conversations, video and text datasets.",
    required=True,
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of every random stream.", flag_values=fv)
  flags.DEFINE_integer("conversations", 12, "Spoken conversations (audio dataset).", flag_values=fv)
  flags.DEFINE_integer("videos", 3, "Conversations rendered as MP4 (video dataset).", flag_values=fv)
  flags.DEFINE_integer("texts", 10, "Text documents: up to 4 .txt notes, the rest chats.", flag_values=fv)
  flags.DEFINE_integer(
    "heldout", 4, "Held-out conversations, from their own random stream (DIR/heldout).", flag_values=fv
  )
  flags.DEFINE_float("seconds", 10.0, "Approximate length of each conversation.", flag_values=fv)
  flags.DEFINE_integer("frame_size", 80, "Square video frame side, a multiple of 40.", flag_values=fv)
  flags.DEFINE_string("raw", None, "Keep the raw inputs in this directory.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """Generates the corpus the parsed command line asks for (`generate`) and prints the summaries."""
  if args:
    cli.fail(PROG, f"takes no positional arguments; got {args}")
  names = ("seed", "conversations", "videos", "texts", "heldout", "seconds", "frame_size", "raw")
  summaries = generate(fv.out, **{name: fv[name].value for name in names})
  for name, text in summaries.items():
    print(f"[{name}]\n{text}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m data_pipelines.sample_corpus ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)
