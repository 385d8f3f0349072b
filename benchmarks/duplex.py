"""Full-duplex behaviour of the CPU recipe (experiments/duplex_cpu.py) on held-out conversations.

Run:  python benchmarks/duplex.py                      (about an hour on 2 cores: it trains the recipe)
      python benchmarks/duplex.py --checkpoint DIR     (scores a trained run only)

1. Data, unless --workdir has it already: `data_pipelines.sample_corpus` makes --conversations training
   conversations (seed --seed) and --heldout held-out ones from a random stream of their own (no
   training row is ever drawn from them).
2. Training: `python -m tmlx.main --config=experiments/duplex_cpu.py` into WORKDIR/run, from scratch;
   its wall time, compilation and its in-loop duplex evaluations included, is a target line.
3. Scoring: `python -m tmlx.eval duplex` on the held-out conversations (WORKDIR/eval: a JSON and PNG
   per conversation, summary.json). For scale, the same scorer's figures for a replay of the reference
   (the ceiling) and a silent model (the floor) are printed beside them.

The metrics are defined in tmlx/eval/duplex.py. The output ends with one line per target:
'<name> <value> target<op><value>'.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = (
  ("takeover_rate", ">=", 0.9),
  ("response_latency_s_p50", "<=", 0.8),
  ("answer_word_accuracy", ">=", 0.8),
  ("bg_call_rate", ">=", 0.9),
  ("false_takeover_rate", "<=", 0.1),
  ("barge_in_yield_s_p50", "<=", 0.6),
  ("voiced_agreement", ">=", 0.8),
  ("mel_error_vs_mean", "<=", 0.6),
)
INFO = ("audio_latency_s_p50", "bg_answer_rate", "answers_expected", "bg_questions", "barge_ins", "user_turns")


def run(cmd: list[str], log: pathlib.Path) -> float:
  """Runs `cmd` in the project root, its output into `log`; returns its wall time in seconds."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    tail = log.read_text()[-3000:]
    raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); the end of {log}:\n{tail}")
  return time.perf_counter() - t0


def make_data(data: pathlib.Path, args) -> None:
  py = sys.executable
  if not (data / "heldout" / "conversations" / "manifest.json").is_file():
    print(f"making {args.conversations} training and {args.heldout} held-out conversations in {data}", flush=True)
    corpus = [py, "-m", "data_pipelines.sample_corpus", f"--out={data}", f"--seed={args.seed}"]
    corpus += [f"--conversations={args.conversations}", f"--heldout={args.heldout}", f"--seconds={args.seconds}"]
    run([*corpus, "--videos=0", "--texts=0"], data / "sample_corpus.log")


def data_overrides(data: pathlib.Path) -> list[str]:
  return [
    f"--config.data.mixture={data / 'conversations'}",
    f"--config.eval.data={data / 'heldout' / 'conversations'}",
  ]


def scale(data: pathlib.Path, checkpoint: str) -> dict[str, dict]:
  """The scorer's figures for a replay of the reference and for a silent model, as yardsticks."""
  from tmlx.eval import duplex
  from tmlx.inference import load_config

  config = load_config(checkpoint)
  conversations, _ = duplex.load_conversations([str(data / "heldout" / "conversations")], config)
  return {
    "replay": duplex.evaluate(duplex.ReplayAgent(), conversations).summary,
    "silent": duplex.evaluate(duplex.SilentAgent(), conversations).summary,
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="workdir/duplex_bench", help="data, the training run and the scores")
  p.add_argument("--checkpoint", default=None, help="score this trained run instead of training one")
  p.add_argument("--conversations", type=int, default=2000, help="training conversations (default 2000)")
  p.add_argument("--heldout", type=int, default=40, help="held-out conversations (default 40)")
  p.add_argument("--seconds", type=float, default=14.0, help="length of each conversation (default 14 s)")
  p.add_argument("--seed", type=int, default=100, help="seed of the generated corpus (default 100)")
  p.add_argument("overrides", nargs="*", help="--config.a.b=v overrides of the training run")
  args = p.parse_args(argv)
  work = (ROOT / args.workdir).resolve() if not os.path.isabs(args.workdir) else pathlib.Path(args.workdir)
  data = work / "data"
  data.mkdir(parents=True, exist_ok=True)
  make_data(data, args)

  train_minutes = None
  checkpoint = args.checkpoint
  if checkpoint is None:
    checkpoint = str(work / "run")
    if os.path.exists(checkpoint):
      raise SystemExit(f"{checkpoint} exists: score it with --checkpoint {checkpoint}, or remove it to train anew")
    cmd = [sys.executable, "-m", "tmlx.main", "--config=experiments/duplex_cpu.py", f"--workdir={checkpoint}"]
    print(f"training experiments/duplex_cpu.py into {checkpoint} (log: {work / 'train.log'})", flush=True)
    train_minutes = run([*cmd, *data_overrides(data), *args.overrides], work / "train.log") / 60
    print(f"  trained in {train_minutes:.1f} min", flush=True)

  out = work / "eval"
  cmd = [sys.executable, "-m", "tmlx.eval", "duplex", f"--checkpoint={checkpoint}"]
  cmd += [f"--data={data / 'heldout' / 'conversations'}", f"--out={out}"]
  print(f"scoring {checkpoint} on the held-out conversations (log: {work / 'eval.log'})", flush=True)
  run(cmd, work / "eval.log")
  summary = json.loads((out / "summary.json").read_text())
  yardsticks = scale(data, checkpoint)

  print(f"\n{'':26s} {'model':>8s} {'replay':>8s} {'silent':>8s}")
  for name in [t[0] for t in TARGETS] + list(INFO):
    row = [summary.get(name), yardsticks["replay"].get(name), yardsticks["silent"].get(name)]
    print(f"  {name:24s} " + " ".join(f"{v:8.3f}" if isinstance(v, float) else f"{v!s:>8s}" for v in row))
  print(f"  per conversation: {out}/<id>.json and .png\n")
  if train_minutes is not None:
    print(f"duplex_train_minutes {train_minutes:.1f} target<=60")
  for name, op, target in TARGETS:
    value = summary.get(name)
    shown = "nan" if value is None else f"{value:.3f}"
    print(f"duplex_{name} {shown} target{op}{target}")


if __name__ == "__main__":
  main()
