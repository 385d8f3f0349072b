"""Look at what the model will eat: one packed row as a picture, and statistics over rows.

    python -m data_pipelines.inspect --config=experiments/sample_cpu.py --step=0 --row=0 --out=row.png
    python -m data_pipelines.inspect --config=experiments/sample_cpu.py --config.data.seq_len=512 --rows=64
    python -m data_pipelines.inspect stats DIR [--json] [--plot=FILE.png]

The PNG shows the row's kind strip, the dMel the model hears (AUDIO_IN) and the dMel and
continuous mel it speaks (AUDIO_OUT), in order, the row's video patches, and the aligned text of
every micro-turn (I: typed text and background results; O: the model's text). The printout gives
positions per micro-turn by kind, the padding ratio and the segments of the row, and with --rows,
the same averaged over the first N rows of the step.

`stats` reports what a dataset directory holds: hours per stream, speech, silence and overlap,
words, background calls, video coverage and skip reasons (`data_pipelines.stats`).

A mistyped path (the config file, --out's directory, a dataset or tokenizer of the config) fails in
one line, checked before any dataset, model or Grain is loaded; nothing is created but --out.
"""

from __future__ import annotations

import collections
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.contract import PATCH_SIZE, Kind
from tmlx import cli, paths

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment file, e.g. experiments/sample_cpu.py.", lock_config=True
)
_STEP = flags.DEFINE_integer("step", 0, "Training step of the row.")
_ROW = flags.DEFINE_integer("row", 0, "Row of the global batch.")
_ROWS = flags.DEFINE_integer("rows", 1, "Rows (from --row on) to average the statistics over.")
_OUT = flags.DEFINE_string("out", None, "Where to write the PNG of row --row (none: no picture).")
flags.mark_flags_as_required(["config"])


def row_stats(row: dict) -> dict:
  """Positions per micro-turn by kind, padding ratio, segments and patches of one row."""
  kinds = row["kind"]
  used = kinds != Kind.PAD
  turns = collections.Counter(zip(row["segment_ids"][used].tolist(), row["micro_turn"][used].tolist()))
  per_kind = {}
  for k in Kind:
    if k == Kind.PAD:
      continue
    per_kind[k.name] = float((kinds == k).sum()) / max(len(turns), 1)
  return {
    "positions": len(kinds),
    "padding_ratio": float((~used).mean()),
    "segments": int(row["segment_ids"].max(initial=0)),
    "micro_turns": len(turns),
    "positions_per_micro_turn": float(used.sum()) / max(len(turns), 1),
    "per_micro_turn_by_kind": per_kind,
    "patches": int((row["patch_index"] >= 0).sum()),
  }


def micro_turn_text(row: dict, tokenizer) -> list[tuple[int, int, str, str]]:
  """(segment, micro-turn, input text, output text) for every micro-turn of the row."""
  out: dict[tuple[int, int], list[list[int]]] = collections.defaultdict(lambda: [[], []])
  for p in np.flatnonzero(row["kind"] != Kind.PAD):
    key = (int(row["segment_ids"][p]), int(row["micro_turn"][p]))
    k = row["kind"][p]
    if k == Kind.TEXT_IN:
      out[key][0].append(int(row["tokens"][p]))
    elif k == Kind.TEXT_OUT:
      out[key][1].append(int(row["tokens"][p]))
    else:
      out.setdefault(key, [[], []])
  return [(s, t, tokenizer.decode(i), tokenizer.decode(o)) for (s, t), (i, o) in out.items()]


def _stream(row: dict, kind: Kind, field: str) -> np.ndarray:
  """[80, frames] image of one audio stream, frames in row order."""
  at = np.flatnonzero(row["kind"] == kind)
  if not len(at):
    return np.zeros((80, 1), np.float32)
  return row[field][at].astype(np.float32).reshape(-1, row[field].shape[-1]).T


def render(row: dict, tokenizer, path: str, title: str) -> None:
  """Writes the picture of one row to `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  text = micro_turn_text(row, tokenizer)
  patches = row["patches"][: int((row["patch_index"] >= 0).sum())]
  fig = plt.figure(figsize=(16, 10 + 0.13 * len(text)))
  grid = fig.add_gridspec(6, 1, height_ratios=[0.4, 2, 2, 2, 2.2, 0.3 + 0.13 * len(text)])
  ax = fig.add_subplot(grid[0])
  ax.imshow(row["kind"][None], aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
  ax.set_yticks([])
  ax.set_title(f"{title}   kinds: " + ", ".join(f"{k.value}={k.name}" for k in Kind), fontsize=9)
  for i, (kind, field, label, lim) in enumerate(
    (
      (Kind.AUDIO_IN, "dmel", "heard: dMel bins of AUDIO_IN", (0, 15)),
      (Kind.AUDIO_OUT, "dmel", "spoken: dMel bins of AUDIO_OUT (its input)", (0, 15)),
      (Kind.AUDIO_OUT, "mel", "spoken: normalized log-mel of AUDIO_OUT (flow target)", (-1, 1)),
    )
  ):
    ax = fig.add_subplot(grid[1 + i])
    ax.imshow(_stream(row, kind, field), aspect="auto", origin="lower", vmin=lim[0], vmax=lim[1])
    ax.set_ylabel("mel channel")
    ax.set_title(f"{label} ({(row['kind'] == kind).sum()} positions)", fontsize=9)
  ax = fig.add_subplot(grid[4])
  if len(patches):
    cols = min(len(patches), 24)
    rows = -(-len(patches) // cols)
    sheet = np.full((rows * (PATCH_SIZE + 2), cols * (PATCH_SIZE + 2), 3), 255, np.uint8)
    for j, p in enumerate(patches):
      r, c = divmod(j, cols)
      sheet[
        r * (PATCH_SIZE + 2) : r * (PATCH_SIZE + 2) + PATCH_SIZE,
        c * (PATCH_SIZE + 2) : c * (PATCH_SIZE + 2) + PATCH_SIZE,
      ] = p
    ax.imshow(sheet)
  ax.set_axis_off()
  ax.set_title(f"video patches ({len(patches)})", fontsize=9)
  ax = fig.add_subplot(grid[5])
  ax.set_axis_off()
  lines = [f"seg {s:2d}  mt {t:5d}  I: {i!s:<40.40}  O: {o}" for s, t, i, o in text]
  ax.text(0, 1, "\n".join(lines) or "(no micro-turns)", family="monospace", fontsize=7, va="top")
  ax.set_title("aligned text per micro-turn", fontsize=9)
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=80)
  plt.close(fig)


def _check_paths(config) -> None:
  """Exits with one line when --out cannot be written or the config names a dataset or tokenizer
  that is not there."""
  from data_pipelines.pipeline import missing_paths

  out = _OUT.value
  if out:
    parent = os.path.dirname(paths.absolute(out))
    if not paths.is_remote(out) and not os.path.isdir(parent):  # object storage has no directories
      sys.exit(f"--out={out}: no directory {parent} to write it in")
    if paths.is_dir(out):
      sys.exit(f"--out={out}: is a directory; give the PNG's file name")
  try:
    missing = missing_paths(config)
  except ValueError as e:  # a malformed data.mixture
    sys.exit(cli.one_line(e))
  if missing:
    sys.exit(missing[0])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG)
  _check_paths(config)
  from data_pipelines.episode import DataError
  from data_pipelines.pipeline import make_source
  from data_pipelines.tokenizer import make_tokenizer

  try:
    source = make_source(config)
    tokenizer = make_tokenizer(config.data.tokenizer)
    rows = [source.row(_STEP.value, _ROW.value + i) for i in range(_ROWS.value)]
  except (DataError, FileNotFoundError, ValueError) as e:  # a bad dataset, or a config the source refuses
    sys.exit(cli.one_line(e))
  first = row_stats(rows[0])
  print(f"row (step {_STEP.value}, row {_ROW.value}) of data.source={config.data.source!r}:")
  for s, t, i, o in micro_turn_text(rows[0], tokenizer):
    print(f"  seg {s:2d}  mt {t:5d}  I: {i!r:40}  O: {o!r}")
  summary = [row_stats(r) for r in rows]
  print(f"stats over {len(rows)} row(s) of {first['positions']} positions:")
  for key in ("padding_ratio", "segments", "micro_turns", "positions_per_micro_turn", "patches"):
    print(f"  {key:26s} {np.mean([s[key] for s in summary]):.3f}")
  print("  positions per micro-turn by kind:")
  for name in first["per_micro_turn_by_kind"]:
    print(f"    {name:10s} {np.mean([s['per_micro_turn_by_kind'][name] for s in summary]):.2f}")
  if _OUT.value:
    render(rows[0], tokenizer, _OUT.value, f"step {_STEP.value} row {_ROW.value}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "stats":
    from data_pipelines import stats

    sys.exit(stats.main(sys.argv[2:]))
  app.run(main, flags_parser=cli.parse_flags)
