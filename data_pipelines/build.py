"""Builds episode datasets (`data_pipelines.episode`) from recordings, videos and text documents.

    python -m data_pipelines.build audio INPUT... --out=DIR [--swap_channels]
        [--user_tier=user] [--model_tier=model] [--ctm_channels=A=user,1=user,B=model,2=model]
    python -m data_pipelines.build video INPUT... --out=DIR [--fps=5] [--width=320] [--height=240] [--swap_channels]
    python -m data_pipelines.build text INPUT... --out=DIR [--words_per_second=10]
    common flags: --on_error=skip|raise (default skip), --episodes_per_shard=64, --num_shards=N
        --runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner [-- RUNNER OPTIONS...]
    audio and video: --allow_truncated (keep what a truncated file holds, with a warning)

An INPUT is a file, a directory (searched recursively for the kind's file types) or a glob pattern,
local or on object storage (`gs://...`).

- audio: a stereo `<stem>.wav` or `<stem>.flac` (channel 0 the user, 1 the model; `--swap_channels`
  swaps them), or a mono pair `<stem>.user.wav` + `<stem>.model.wav` (or .flac) with equal sample
  rates and lengths equal within 1 ms (the shorter is padded with silence). Audio at another rate
  is resampled to 16 kHz.
- video: `<stem>.mp4` (also .m4v, .mov) with an audio track: stereo is user and model, mono is the
  user with a silent model. Frames are sampled at `--fps` and resized to `--width` x `--height`
  (multiples of 40).
- Each recording or video needs a transcript beside it: `<stem>.json`, `<stem>.TextGrid` or
  `<stem>.ctm` (formats in `data_pipelines.transcripts`).
- text: `.txt` files (the whole file is the model's text, blank lines separate paragraphs) and
  `.jsonl` files, one document per line: {"turns": [{"speaker": "user" | "model", "text": str}, ...]}.
  A text-only episode has no audio. The first micro-turn is left empty; the model's words then
  follow one another at `--words_per_second`; a user turn becomes a `typed_text` event at the time
  it occurs, and the model's next words start in the following micro-turn. A paragraph ends with
  "\\n\\n" on its last word and one silent micro-turn. The episode ends 0.2 s after its last word or event.

Media are read only as far as they hold, never as far as they claim. A WAV whose data chunk (or any
file whose header) promises more frames than it holds, and an MP4/MOV that ends inside one of its
boxes or whose video or audio ends before its declared end, is "truncated": skipped, or with
`--allow_truncated` kept as far as it goes. A video frame past the file's declared duration or far
past the end of its audio (limits in `data_pipelines.video.decode_mp4`) makes the file a
"timestamps" skip, found before any memory is spent on the gap: the time is what is wrong, not the
decoding.

Episode ids are the file stems (for .jsonl: `<stem>-<line number>`) and must be unique. Every episode
is validated; a bad input is skipped and counted by its DataError reason (`--on_error=raise` raises
instead): "audio" (unreadable, or the wrong channel count), "missing" (half of a pair), "length"
(mismatched halves of a pair), "empty" (a document with no text), "sample_rate", "non_finite",
"transcript" (missing or malformed transcript or .jsonl line), "timestamps", "video", "truncated" and
"duplicate". A written episode may carry warnings, each logged with its file and counted once per
episode: "clipped" (audio outside [-1, 1], clipped to int16), "resampled_below_8khz" (recorded below
8 kHz) and "truncated_kept" (a truncated file kept with --allow_truncated).

`--out` is checked before any input is read: it must be a directory (or a `gs://` URL), or creatable
as one, that can be written to. Each input goes to a shard by a hash of its episode id (`--num_shards`
shards, or one per `--episodes_per_shard` inputs), and each shard is built on its own, one episode
at a time, in this process or, with `--runner`, on Apache Beam with the runner's pipeline options
after `--` (`data_pipelines.shards`, `data_pipelines.beam`): the shards and `manifest.json` are the
same bytes either way, with any number of workers. The manifest records the skips per reason, the
warnings per kind and the dataset's statistics (`python -m data_pipelines.inspect stats DIR`). A
rerun keeps the shards an earlier build of the same inputs completed (verified by their SHA-256) and
builds the rest, so a killed build resumes; shards of an earlier build that this one does not list
are removed. A summary is printed: `shards: W written, K kept from an earlier build`, `episodes
written: N`, `skipped: M` and one line per reason, `warnings: K` and one line per kind.

The exit status is non-zero when no episode was written; a bad `--out` (status 2), a failed write
(status 1, e.g. disk full) or a failed pipeline (status 1) ends the build with a one-line error
naming the path, and so does a bad command line or pipeline option (status 2).

Here: `build_dataset`, what the command runs (check --out, plan, build the shards, merge, summarize),
`write_episodes` (episodes already in memory, for small datasets), and the command line
(`main(argv)` runs it in-process). The builders of each kind are in `data_pipelines.builders`.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence

from absl import flags

from data_pipelines import beam, shards, transcripts
from data_pipelines.builders import KINDS, ON_ERROR, Builder
from data_pipelines.builders import build_audio_episodes as build_audio_episodes
from data_pipelines.builders import build_text_episodes as build_text_episodes
from data_pipelines.builders import build_video_episodes as build_video_episodes
from data_pipelines.episode import MANIFEST, DataError, Episode, write_dataset
from tmlx import cli, paths

PROG = "python -m data_pipelines.build"


def write_episodes(episodes: list[Episode], out: str | os.PathLike, episodes_per_shard: int = 64) -> int:
  """Writes a dataset to `out` (a directory or an object-store URL, written locally and then copied:
  `write_dataset`), removing shards of an earlier build that the new manifest does not list."""
  write_dataset(episodes, out, episodes_per_shard=episodes_per_shard)
  keep = set(json.loads(paths.read_text(paths.join(out, MANIFEST)))["shards"])
  for name in paths.listdir(out):
    if fnmatch.fnmatch(name, "episodes-*-of-*.array_record") and name not in keep:
      paths.remove(paths.join(out, name))
  return len(episodes)


def summary(written: int, skips: collections.Counter, warnings: collections.Counter | None = None) -> str:
  """The build summary: episodes written, skipped, one line per skip reason, then (if counted) the warnings."""
  lines = [f"episodes written: {written}", f"skipped: {sum(skips.values())}"]
  lines += [f"  {reason}: {n}" for reason, n in sorted(skips.items())]
  if warnings is not None:
    lines.append(f"warnings: {sum(warnings.values())}")
    lines += [f"  {kind}: {n}" for kind, n in sorted(warnings.items())]
  return "\n".join(lines)


class OutputError(Exception):
  """A dataset directory that cannot be used or written; `status` is the exit status it ends a build with."""

  def __init__(self, message: str, status: int = 1):
    super().__init__(message)
    self.status = status


def check_out(out: str | os.PathLike) -> None:
  """Raises OutputError (status 2) unless `out` is a writable directory or can be created as one
  (an object-store URL: unless an object has that name; whether the bucket takes writes shows when
  the dataset is copied there)."""
  if paths.is_remote(out):
    if paths.is_file(out):
      raise OutputError(f"--out {out}: exists and is not a directory", 2)
    return
  path = pathlib.Path(out)
  if os.path.lexists(path) and not path.is_dir():
    raise OutputError(f"--out {path}: exists and is not a directory", 2)
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise OutputError(f"--out {path}: cannot be created, {existing} is not a directory", 2)
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created, {existing} is not writable"
    raise OutputError(f"--out {path}: {what}", 2)


def build_dataset(
  kind: str,
  inputs: Iterable[str | os.PathLike],
  out: str | os.PathLike,
  *,
  on_error: str = "skip",
  episodes_per_shard: int = 64,
  num_shards: int = 0,
  runner: str = "",
  runner_args: Sequence[str] = (),
  **options,
) -> int:
  """Builds the episodes of `kind` ('audio', 'video' or 'text') from `inputs` into shards in `out`
  (`data_pipelines.shards`: in this process, or on Apache Beam's `runner` with its pipeline
  options `runner_args`), then prints the summary; returns the exit status: 0 when an episode was
  written, else 1. Shards that an earlier build of the same inputs completed are kept.

  `options` go to the kind's `Builder`. `out` is checked before any input is read. Raises
  OutputError for a bad `out` (status 2), a failed write or a failed pipeline (status 1), and
  DataError for a bad input when `on_error="raise"` (on Beam: the OutputError of the failed
  pipeline, naming it); FileNotFoundError when `inputs` name no input, and SystemExit for a bad
  runner or pipeline option.
  """
  if kind not in KINDS:
    raise ValueError(f"kind is {kind!r}; want one of {KINDS}")
  check_out(out)
  if runner:  # a bad runner or option fails before any input is read
    inputs = list(map(os.fspath, inputs))
    options_of_runner = beam.pipeline_options(runner, runner_args)
    beam.check_paths(runner, inputs, os.fspath(out))
  plan = shards.plan(
    Builder(kind, options), inputs, out, episodes_per_shard=episodes_per_shard, num_shards=num_shards, on_error=on_error
  )
  try:
    if runner:
      manifest, written, reused = beam.build(plan, options_of_runner)
    else:
      manifest, written, reused = shards.build_in_process(plan, progress=print)
  except beam.PipelineError as e:
    raise OutputError(f"the build on {runner} failed (shards written so far are kept): {e}") from None
  except (OSError, RuntimeError) as e:  # ArrayRecordWriter reports a failed write as a RuntimeError
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise OutputError(f"cannot write the dataset to {out}: {message}") from None
  episodes = len(manifest["episodes"])
  print(f"shards: {written} written, {reused} kept from an earlier build (complete and verified)")
  print(summary(episodes, collections.Counter(manifest["skipped"]), collections.Counter(manifest["warnings"])))
  return 0 if episodes else 1


# The command line.

_MEDIA_FLAGS = ("swap_channels", "allow_truncated", "user_tier", "model_tier", "ctm_channels")
# The flags of each kind besides --out, --on_error and --episodes_per_shard: the builder's keyword arguments.
KIND_FLAGS = {"audio": _MEDIA_FLAGS, "video": (*_MEDIA_FLAGS, "fps", "width", "height"), "text": ("words_per_second",)}


class _ChannelMap(flags.ArgumentParser):
  """CHANNEL=SPEAKER,... (e.g. A=user,B=model) to {channel: speaker}."""

  def parse(self, argument):
    if isinstance(argument, dict):
      return argument
    out = {}
    for item in argument.split(","):
      key, sep, speaker = item.partition("=")
      if not sep or speaker not in transcripts.SPEAKERS:
        raise ValueError(f"{item!r}: want CHANNEL=user or CHANNEL=model")
      out[key] = speaker
    return out

  def flag_type(self) -> str:
    return "CHANNEL=SPEAKER list"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", None, "Dataset directory (or gs:// URL) to write.", required=True, flag_values=fv)
  flags.DEFINE_enum("on_error", "skip", ON_ERROR, "Skip and count bad inputs, or raise.", flag_values=fv)
  flags.DEFINE_integer(
    "episodes_per_shard",
    64,
    "Inputs per ArrayRecord shard, on average (sets the shard count).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_shards", 0, "Number of shards (0: one per --episodes_per_shard inputs).", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_string(
    "runner",
    "",
    "Apache Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...) to build on; "
    "its pipeline options go after --. Empty: build in this process.",
    flag_values=fv,
  )
  # audio and video
  flags.DEFINE_bool("swap_channels", False, "Channel 0 is the model, 1 the user.", flag_values=fv)
  flags.DEFINE_bool(
    "allow_truncated", False, "Keep what a truncated file holds (counted as a warning).", flag_values=fv
  )
  flags.DEFINE_string("user_tier", "user", "TextGrid interval tier of the user's words.", flag_values=fv)
  flags.DEFINE_string("model_tier", "model", "TextGrid interval tier of the model's words.", flag_values=fv)
  flags.DEFINE(_ChannelMap(), "ctm_channels", None, "CTM channel mapping, e.g. A=user,B=model.", flag_values=fv)
  # video
  flags.DEFINE_float("fps", 5.0, "Frames per second sampled from each video.", flag_values=fv)
  flags.DEFINE_integer("width", 320, "Frame width, a multiple of 40.", flag_values=fv)
  flags.DEFINE_integer("height", 240, "Frame height, a multiple of 40.", flag_values=fv)
  # text
  flags.DEFINE_float("words_per_second", 10.0, "Pace of a text-only episode's words.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """Builds what the parsed command line asks for (`build_dataset`); a bad command line, a bad
  `--out` or input path, or a failed write ends it in one line."""
  runner_args = args[args.index("--") + 1 :] if "--" in args else []
  args = args[: args.index("--")] if "--" in args else args
  if runner_args and not fv.runner:
    cli.fail(PROG, "arguments after -- are the options of a Beam runner; give --runner too")
  if not args or args[0] not in KINDS:
    got = repr(args[0]) if args else "nothing"
    cli.fail(PROG, f"the first argument is the kind of input, one of {', '.join(KINDS)}; got {got}")
  kind, inputs = args[0], args[1:]
  if not inputs:
    cli.fail(PROG, f"give one or more INPUTs after {kind!r}: files, directories or glob patterns")
  for name in sorted({n for names in KIND_FLAGS.values() for n in names} - set(KIND_FLAGS[kind])):
    if fv[name].present:
      cli.fail(PROG, f"--{name} is not a flag of {kind!r} builds")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  options = {name: fv[name].value for name in KIND_FLAGS[kind]}
  try:
    with cli.one_line_exits(PROG):
      return build_dataset(
        kind,
        inputs,
        fv.out,
        on_error=fv.on_error,
        episodes_per_shard=fv.episodes_per_shard,
        num_shards=fv.num_shards,
        runner=fv.runner,
        runner_args=runner_args,
        **options,
      )
  except DataError:  # --on_error=raise: the traceback is what was asked for
    raise
  except OutputError as e:
    cli.fail(PROG, str(e), e.status)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(PROG, str(e))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m data_pipelines.build ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv, passthrough=True)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run, passthrough=True)
