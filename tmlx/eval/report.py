"""The duplex evaluation's outputs for people (`tmlx.eval.duplex`): per-conversation JSON and PNG
and summary.json (`write_outputs`), and the text of a summary and of a report for logs.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from data_pipelines.contract import MICRO_TURN_SECONDS
from tmlx import paths
from tmlx.eval.conversations import Conversation, Transcript
from tmlx.eval.evaluation import Result
from tmlx.eval.scoring import stream_words, user_ipus, utterances, voiced_windows


def write_outputs(result: Result, out_dir: str) -> None:
  """Per-conversation JSON and PNG and summary.json in `out_dir` (a local directory or a URL)."""
  paths.makedirs(out_dir)
  for entry in result.conversations:
    conversation, live = entry["_conversation"], entry["_live"]
    data = {k: v for k, v in entry.items() if not k.startswith("_")}
    with paths.open(paths.join(out_dir, f"{_safe(entry['id'])}.json"), "w") as f:
      json.dump(data, f, indent=1, default=_jsonable)
    plot_conversation(paths.join(out_dir, f"{_safe(entry['id'])}.png"), conversation, live, entry)
  with paths.open(paths.join(out_dir, "summary.json"), "w") as f:
    json.dump(result.summary, f, indent=1, default=_jsonable)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _jsonable(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(type(x))


def plot_conversation(path: str, conv: Conversation, live: Transcript, entry: dict) -> None:
  """Reference and model turns, background calls and results, and voiced windows on one time axis."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  seconds = conv.windows * MICRO_TURN_SECONDS + MICRO_TURN_SECONDS
  fig, ax = plt.subplots(figsize=(max(10, seconds * 1.4), 4.2))
  rows = {"user": 3, "reference": 2, "model": 1}
  for ipu in user_ipus(conv):
    ax.broken_barh([(ipu.start, max(ipu.end - ipu.start, 0.05))], (rows["user"] - 0.3, 0.6), color="tab:blue")
    ax.text(ipu.start, rows["user"] + 0.35, " ".join(ipu.words), fontsize=7, color="tab:blue")
  for name, tr, colour in (("reference", conv.reference, "tab:green"), ("model", live, "tab:orange")):
    y = rows[name]
    voiced = voiced_windows(tr.mel)
    spans = [((t + 1) * MICRO_TURN_SECONDS, MICRO_TURN_SECONDS) for t in np.flatnonzero(voiced)]
    ax.broken_barh(spans, (y - 0.12, 0.24), color=colour, alpha=0.35)
    for u in utterances(stream_words(tr.texts)):
      ax.broken_barh([(u.start, u.end - u.start)], (y - 0.3, 0.6), facecolor="none", edgecolor=colour)
      ax.text(u.start, y + 0.35, " ".join(u.words), fontsize=7, color=colour)
    for t, c in tr.calls:
      ax.plot((t + 1) * MICRO_TURN_SECONDS, y - 0.45, marker="v", color="tab:red")
      ax.text((t + 1) * MICRO_TURN_SECONDS, y - 0.62, f"call: {c}", fontsize=6, color="tab:red")
    for t, r in tr.results:
      ax.plot(t * MICRO_TURN_SECONDS, y - 0.45, marker="^", color="tab:purple")
      ax.text(t * MICRO_TURN_SECONDS, y - 0.75, f"result: {r}", fontsize=6, color="tab:purple")
  ax.set_yticks(list(rows.values()), list(rows))
  ax.set_ylim(0.2, 3.8)
  ax.set_xlim(0, seconds)
  ax.set_xlabel("seconds")
  m = entry["metrics"]
  ax.set_title(
    f"{conv.id}: takeover {m['takeover_rate']:.2f}, word accuracy {m['answer_word_accuracy']:.2f}, "
    f"false takeovers {m['false_takeover_rate']:.2f}/turn, voiced agreement {m['voiced_agreement']:.2f}",
    fontsize=9,
  )
  fig.tight_layout()
  with paths.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


def report(result: Result, *, max_turns: int = 16) -> str:
  """What happened in each expecting turn (user, model, reference), then the summary: for logs."""
  lines = []
  for entry in result.conversations:
    for turn in entry["turns"]:
      if not turn["expects_answer"] or len(lines) >= max_turns:
        continue
      latency = f"{turn['latency_s']:.1f}s" if "latency_s" in turn else "-"
      lines.append(
        f"  {entry['id']} {turn['end']:5.1f}s  user: {turn['user'][:40]!r}  model ({latency}): "
        f"{turn['model_answer'][:40]!r}  reference: {turn['reference_answer'][:40]!r}"
      )
  return "\n".join(lines + [format_summary(result.summary)])


SUMMARY_ORDER = (
  "takeover_rate",
  "response_latency_s_p50",
  "audio_latency_s_p50",
  "answer_word_accuracy",
  "bg_call_rate",
  "bg_answer_rate",
  "false_takeover_rate",
  "barge_in_yield_s_p50",
  "voiced_agreement",
  "mel_error_vs_mean",
)


def format_summary(summary: dict) -> str:
  head = (
    f"{summary['conversations']} conversations, {summary['user_turns']} user turns "
    f"({summary['answers_expected']} expecting an answer, {summary['bg_questions']} needing the background "
    f"model), {summary['barge_ins']} barge-ins"
  )
  lines = [head] + [f"  {k:24s} {summary[k]:.3f}" for k in SUMMARY_ORDER if k in summary]
  return "\n".join(lines)
