"""What a dataset directory holds, in numbers: hours per stream, speech, silence and overlap, words,
background calls, video coverage, and the skip reasons and warnings of the build that wrote it.

    python -m data_pipelines.inspect stats DIR [--json] [--plot=FILE.png]

`episode_stats` gives one episode's figures as a flat dict of summable numbers and `add` sums two
such dicts, so that a builder can record a dataset's totals in its manifest ("stats"). When the
manifest has them, `dataset_stats` reads nothing else; otherwise it reads every episode, one at a
time, and sums them. Speech time is the union of a speaker's word intervals; overlap is the time
both speak at once, silence the time neither does (both only for episodes with audio).
`format_stats` writes the report; the command prints it (or the JSON) and can draw a figure.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from absl import flags

from data_pipelines.episode import MANIFEST, DataError, Episode, EpisodeReader, Word
from data_pipelines.episode.manifest import load_manifest
from tmlx import cli, paths

STAT_KEYS = (
  "episodes",
  "seconds",
  "audio_seconds",
  "video_seconds",
  "text_only_seconds",
  "video_frames",
  "user_speech_seconds",
  "model_speech_seconds",
  "overlap_seconds",
  "silence_seconds",
  "user_words",
  "model_words",
  "typed_text",
  "bg_calls",
  "bg_results",
)
BAR_WIDTH = 40

Intervals = list[tuple[float, float]]


def _union(words: list[Word], duration: float) -> Intervals:
  """The disjoint, sorted intervals covered by `words`, clipped to [0, duration]."""
  spans = sorted((max(w.start, 0.0), min(w.end, duration)) for w in words)
  merged: Intervals = []
  for start, end in spans:
    if end <= start:
      continue
    if merged and start <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], end))
    else:
      merged.append((start, end))
  return merged


def _length(spans: Intervals) -> float:
  return sum(end - start for start, end in spans)


def _intersection(a: Intervals, b: Intervals) -> float:
  """The length of the intersection of two disjoint, sorted interval lists."""
  i = j = 0
  total = 0.0
  while i < len(a) and j < len(b):
    total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def _rounded(x: float | int) -> float | int:
  return round(x, 6) if isinstance(x, float) else x


def episode_stats(ep: Episode) -> dict[str, float | int]:
  """One episode's summable figures (the keys of STAT_KEYS); floats rounded to 6 decimals."""
  duration = float(ep.duration)
  speech = {"user": 0.0, "model": 0.0, "overlap": 0.0, "silence": 0.0}
  if ep.has_audio:
    user, model = _union(ep.user_words, duration), _union(ep.model_words, duration)
    speech["user"], speech["model"] = _length(user), _length(model)
    speech["overlap"] = _intersection(user, model)
    speech["silence"] = duration - _length(_union([*ep.user_words, *ep.model_words], duration))
  stats = {
    "episodes": 1,
    "seconds": duration,
    "audio_seconds": duration if ep.has_audio else 0.0,
    "video_seconds": duration if ep.has_video else 0.0,
    "text_only_seconds": duration if not (ep.has_audio or ep.has_video) else 0.0,
    "video_frames": 0 if ep.frames is None else len(ep.frames),
    "user_speech_seconds": speech["user"],
    "model_speech_seconds": speech["model"],
    "overlap_seconds": speech["overlap"],
    "silence_seconds": speech["silence"],
    "user_words": len(ep.user_words),
    "model_words": len(ep.model_words),
    "typed_text": len(ep.typed_text),
    "bg_calls": len(ep.bg_calls),
    "bg_results": len(ep.bg_results),
  }
  return {k: _rounded(v) for k, v in stats.items()}


def add(a: dict, b: dict) -> dict:
  """Key-wise sum of two stats dicts (a missing key counts as 0), floats rounded to 6 decimals, keys sorted."""
  return {k: _rounded(a.get(k, 0) + b.get(k, 0)) for k in sorted({*a, *b})}


def _counts(manifest: dict, key: str, where: str) -> dict[str, int] | None:
  """The manifest's reason -> count dict under `key`, None when it has none."""
  value = manifest.get(key)
  if value is None:
    return None
  if not isinstance(value, dict) or not all(
    isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) for k, n in value.items()
  ):
    raise DataError("schema", where, f"malformed manifest: field {key!r} is not an object of integer counts")
  return value


def dataset_stats(directory: str) -> dict:
  """{"stats", "skipped", "warnings", "shards"} of a dataset directory (a local path or a URL): its
  manifest's "stats" if it has them, else the sum of `episode_stats` over every episode. "skipped"
  and "warnings" are None when the manifest does not record them. Raises FileNotFoundError without
  a manifest, DataError for a malformed manifest or episode."""
  where = paths.join(directory, MANIFEST)
  manifest = load_manifest(paths.path(directory))
  shards = manifest.get("shards", [])
  skipped, warnings = _counts(manifest, "skipped", where), _counts(manifest, "warnings", where)
  stats = manifest.get("stats")
  if stats is not None:
    if not isinstance(stats, dict) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in stats.values()
    ):
      raise DataError("schema", where, "malformed manifest: field 'stats' is not an object of numbers")
    stats = add(dict.fromkeys(STAT_KEYS, 0), stats)
  else:
    reader = EpisodeReader(directory)
    stats = functools.reduce(
      add, (episode_stats(reader.read(i)) for i in range(len(reader))), dict.fromkeys(STAT_KEYS, 0)
    )
  return {"stats": stats, "skipped": skipped, "warnings": warnings, "shards": len(shards)}


def _ratio(a: float, b: float) -> float | None:
  return a / b if b else None


def _num(x: float | None, spec: str = ".1f", unit: str = "") -> str:
  return "n/a" if x is None else f"{x:{spec}}{unit}"


def _bar(fraction: float | None) -> str:
  return "" if fraction is None else "#" * round(min(max(fraction, 0.0), 1.0) * BAR_WIDTH)


def _counted(title: str, what: str, counts: dict[str, int] | None) -> list[str]:
  """Lines for the skip reasons (or warnings): the total, then one line per reason with a bar."""
  if counts is None:
    return [f"{what}: not recorded in this manifest"]
  total = sum(counts.values())
  lines = [f"{title}: {total}"]
  width = max((len(k) for k in counts), default=0)
  for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    lines.append(f"  {reason:<{width}}  {n:6d}  {_bar(_ratio(n, total))}")
  return lines


def fractions(stats: dict) -> dict[str, float | None]:
  """User speech, model speech, overlap and silence as fractions of audio time (None without audio)."""
  audio = stats.get("audio_seconds", 0)
  return {
    "user speech": _ratio(stats.get("user_speech_seconds", 0), audio),
    "model speech": _ratio(stats.get("model_speech_seconds", 0), audio),
    "overlap": _ratio(stats.get("overlap_seconds", 0), audio),
    "silence": _ratio(stats.get("silence_seconds", 0), audio),
  }


def streams(stats: dict) -> dict[str, float]:
  """Hours of audio (every audio episode has both channels), of speech in each channel, of video
  and of text-only episodes."""
  return {
    "audio": stats.get("audio_seconds", 0) / 3600,
    "user speech": stats.get("user_speech_seconds", 0) / 3600,
    "model speech": stats.get("model_speech_seconds", 0) / 3600,
    "video": stats.get("video_seconds", 0) / 3600,
    "text-only": stats.get("text_only_seconds", 0) / 3600,
  }


def format_stats(result: dict) -> str:
  """The human-readable report of a `dataset_stats` result."""
  s = result["stats"]
  seconds = s.get("seconds", 0)
  minutes, hours = seconds / 60, seconds / 3600
  lines = [
    f"episodes: {s.get('episodes', 0)} in {result.get('shards', 0)} shard(s)",
    f"hours: {hours:.3f} total ({seconds:.1f} s)",
  ]
  for name, h in streams(s).items():
    lines.append(f"  {name:<12}  {h:9.3f} h  {_num(_ratio(h, hours), '6.1%')} of the time")
  lines.append(f"time of the audio episodes ({s.get('audio_seconds', 0) / 3600:.3f} h):")
  for name, f in fractions(s).items():
    lines.append(f"  {name:<12}  {_num(f, '6.1%'):>6}  {_bar(f)}")
  lines.append("words per minute (of all episode time):")
  for who in ("user", "model"):
    n = s.get(f"{who}_words", 0)
    lines.append(f"  {who:<12}  {_num(_ratio(n, minutes), '6.1f'):>6}  ({n} words)")
  lines.append(f"typed text: {s.get('typed_text', 0)} events")
  for key, name in (("bg_calls", "calls"), ("bg_results", "results")):
    n = s.get(key, 0)
    lines.append(f"background {name}: {n} ({_num(_ratio(n, hours), '.1f')} per hour)")
  video = s.get("video_seconds", 0)
  lines.append(
    f"video: {_num(_ratio(video, seconds), '.1%')} of the time, "
    f"{_num(_ratio(s.get('video_frames', 0), video), '.2f')} frames per video second"
  )
  lines += _counted("skipped", "skip reasons", result.get("skipped"))
  lines += _counted("warnings", "warnings", result.get("warnings"))
  return "\n".join(line.rstrip() for line in lines)


def plot(result: dict, path: str) -> None:
  """Writes a figure of a `dataset_stats` result to `path`: hours per stream, and the time fractions."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = result["stats"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  hours = streams(s)
  left.bar(list(hours), list(hours.values()), color="tab:blue")
  left.set_ylabel("hours")
  left.set_title(f"hours per stream ({s.get('episodes', 0)} episodes)", fontsize=10)
  parts = fractions(s)
  right.bar(list(parts), [100 * (f or 0.0) for f in parts.values()], color="tab:orange")
  right.set_ylabel("% of audio time")
  right.set_ylim(0, 100)
  right.set_title("speech, overlap and silence", fontsize=10)
  for ax in (left, right):
    ax.tick_params(axis="x", labelsize=8)
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=80)
  plt.close(fig)


# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m data_pipelines.inspect stats"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("json", False, "Print the result as JSON.", flag_values=fv)
  flags.DEFINE_string(
    "plot", None, "Where to write a bar chart of the hours and time fractions (a PNG; none: no figure).", flag_values=fv
  )


def _check_plot(path: str) -> None:
  """Exits with one line when the --plot file cannot be written where it is named."""
  if paths.is_remote(path):  # object storage has no directories
    return
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    sys.exit(f"--plot={path}: no directory {parent} to write it in")
  if os.path.isdir(path):
    sys.exit(f"--plot={path}: is a directory; give the figure's file name")
  if not os.access(parent, os.W_OK):
    sys.exit(f"--plot={path}: cannot write in directory {parent}")


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """Prints the statistics of the one dataset directory the command line names."""
  if len(args) != 1:
    cli.fail(PROG, f"takes one dataset directory; got {len(args)} arguments{f' {args}' if args else ''}")
  with cli.one_line_exits(PROG):
    if fv.plot:
      _check_plot(fv.plot)
    try:
      result = dataset_stats(args[0])
    except (OSError, ValueError) as e:  # no manifest, a malformed one, or a bad episode (DataError)
      sys.exit(cli.one_line(e))
    if fv.json:
      print(json.dumps(result, indent=1, sort_keys=True))
    else:
      print(format_stats(result))
    if fv.plot:
      try:
        plot(result, fv.plot)
      except OSError as e:
        sys.exit(f"--plot={fv.plot}: {cli.one_line(e)}")
      print(f"wrote {fv.plot}", file=sys.stderr if fv.json else sys.stdout)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs `python -m data_pipelines.inspect stats ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)
