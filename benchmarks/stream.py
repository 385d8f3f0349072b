"""Micro-turn latency of streaming sessions (tmlx.stream.Session) on one CPU device.

Run:  python benchmarks/stream.py     (about 5 minutes on 2 shared cores)

Every micro-turn of every session here gets the same kind of input and says the same amount:
200 ms of noise as the user's audio, a video frame of the preset's size (5 frames/s, the spec's
rate), and a scripted answer of k text tokens then <eot>, k drawn uniformly from 0..K_max (the
tokens are forced, but the sampler still runs, so a step costs what free decoding costs), then
the 4 AUDIO_OUT steps through the flow head's sampler. Models are freshly initialized (latency
does not depend on the weights), in fp32 (bf16 matmuls are slower on XLA:CPU).

It measures, in one process:
  1. Context. One session is run to 1,000 micro-turns of context; in interleaved rounds, a
     micro-turn of it is timed against the same micro-turn of a session reset to 10 micro-turns
     of context. Headline: the ratio of medians, with the preset's `stream.window` (the KV cache
     a ring of that many positions). The same ratio with window 0 (every position attends to the
     whole session) is printed as information: on this CPU, attention over ~15k positions of a
     128-wide model costs several times the rest of its micro-turn.
  2. Recompute. At 500 micro-turns of context, a window-0 session's micro-turn (exact: attends to
     everything) against one forward pass of the model over the same 500 micro-turns, packed as
     one sequence: what a decoder without a KV cache pays at least once per micro-turn (in fact
     once per generated position). Headline: the speedup, median over interleaved rounds.
  3. Budget. p50/p99 of micro-turn latency over a fresh session of --turns micro-turns, for the
     sample_cpu (the tiny model) and cpu_bench presets, against the 200 ms real-time budget (a
     micro-turn must be said before the next one is heard). Target: tiny's p99 within 50 ms; cpu_bench (1024 wide) is
     information.

The output ends with one line per headline figure: '<name> <value> target<op><value>'.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.contract import AUDIO_POSITIONS_PER_MICRO_TURN, SAMPLES_PER_MICRO_TURN, Kind  # noqa: E402
from tmlx.nn.model import ModelConfig  # noqa: E402
from tmlx.state import new_model  # noqa: E402
from tmlx.stream import Session, StreamConfig  # noqa: E402

BUDGET_MS = 200.0


def preset(name: str):
  """The preset's config in fp32 on one device, and a fresh model of it."""
  c = importlib.import_module(f"experiments.{name}").get_config()
  c.model.compute_dtype = "float32"
  return c, new_model(ModelConfig.from_config(c.model), 0)


class Script:
  """The inputs and scripted answers of micro-turns, the same for every session of a preset."""

  def __init__(self, c, seed: int):
    self.rng = np.random.default_rng(seed)
    self.frame_shape = (c.data.frame_height, c.data.frame_width, 3)
    self.k_max = c.data.k_max

  def turn(self, eot: int) -> tuple[dict, list[int]]:
    audio = (self.rng.standard_normal(SAMPLES_PER_MICRO_TURN) * 3000).astype(np.int16)
    frame = self.rng.integers(0, 256, self.frame_shape, dtype=np.uint8)
    k = int(self.rng.integers(0, self.k_max + 1))
    text = [int(t) for t in self.rng.integers(70, 120, k)] + [eot]  # plain letters
    return {"audio": audio, "frame": frame}, text


def step(session: Session, turn, history: list | None = None) -> float:
  inputs, text = turn
  out = session.step(inputs["audio"], frame=inputs["frame"], forced_text=text)
  if history is not None:
    history.append((session.input_block(out.heard_dmel, inputs["frame"]), text))
  return out.latency_s * 1e3


def packed(history: list, cfg) -> dict[str, jax.Array]:
  """The micro-turns a session went through as one packed row (`InteractionModel.__call__`)."""
  kind, tokens, dmel, index, patches, rowcol = [], [], [], [], [], []
  f, a = cfg.frames_per_position, AUDIO_POSITIONS_PER_MICRO_TURN
  for block, text in history:
    n_out = len(text) + a
    kind += [block.kind, np.r_[[Kind.TEXT_OUT] * len(text), [Kind.AUDIO_OUT] * a].astype(np.int8)]
    tokens += [block.tokens, np.r_[text, [0] * a].astype(np.int32)]
    dmel += [block.dmel, np.zeros((n_out, f, 80), np.uint8)]
    offset = sum(len(p) for p in patches)
    index += [np.where(block.patch_index >= 0, block.patch_index + offset, -1), np.full(n_out, -1, np.int32)]
    patches.append(block.patches)
    rowcol.append(block.patch_rowcol)
  kind = np.concatenate(kind)
  row = {
    "kind": kind,
    "tokens": np.concatenate(tokens),
    "dmel": np.concatenate(dmel),
    "patch_index": np.concatenate(index),
    "positions": np.arange(len(kind), dtype=np.int32),
    "segment_ids": np.ones(len(kind), np.int32),
  }
  batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
  batch["patches"] = jnp.asarray(np.concatenate(patches)[None])
  batch["patch_rowcol"] = jnp.asarray(np.concatenate(rowcol)[None])
  return batch


def recompute_program(model):
  """One forward pass over the whole context, then the text head at its last position."""

  @jax.jit
  def forward(batch):
    hidden = model(batch).hidden
    return model.text_logits(hidden[0, -1])

  return forward


def timed(fn, *args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t) * 1e3


def context_and_recompute(args) -> dict[str, float]:
  c, model = preset("sample_cpu")
  c0 = copy.deepcopy(c)  # the same model without its attention window: attending to the whole session
  c0.model.attention_window = 0
  c0.stream.window = 0
  c0.stream.max_positions = (args.long + 50) * 32
  whole = new_model(ModelConfig.from_config(c0.model), 0)  # latency does not depend on the weights
  sessions = {
    "ring": Session(model, StreamConfig.from_config(c)),  # long context, the preset's window
    "whole": Session(whole, StreamConfig.from_config(c0)),  # long context, window 0
    "short": Session(model, StreamConfig.from_config(c)),
    "short_whole": Session(whole, StreamConfig.from_config(c0)),
  }
  scripts = {name: Script(c, args.seed) for name in sessions}  # the same turns in the same order

  def next_turn(name: str):
    return scripts[name].turn(sessions[name]._eot)

  print(
    f"tiny: window {c.stream.window} positions (ring of {sessions['ring'].cache_slots} slots), "
    f"attention block {c.stream.attention_block}; filling {args.long} micro-turns of context ..."
  )
  history: list = []
  curve = {}
  t0 = time.perf_counter()
  for t in range(args.long):
    if t == args.recompute:  # 2. the window-0 session against a forward pass over its context
      # ... by the same window-0 model: the windowed one's pass skips what its window leaves out.
      forward = recompute_program(whole)
      batch = packed(history, model.cfg)
      timed(forward, batch)  # compile
      rec, cached = [], []
      for _ in range(args.recompute_rounds):
        rec.append(timed(forward, batch))
        step(sessions["whole"], next_turn("whole"))  # warm again after the forward pass
        cached.append(step(sessions["whole"], next_turn("whole")))
        step(sessions["ring"], next_turn("ring"))
      positions = batch["kind"].shape[1]
      print(
        f"  at {t} micro-turns ({positions} positions): forward pass over the context {statistics.median(rec):.0f} ms, "
        f"window-0 session micro-turn {statistics.median(cached):.1f} ms"
      )
      speedup = statistics.median(r / s for r, s in zip(rec, cached))
      del forward, batch
    lat = {
      name: step(sessions[name], next_turn(name), history if name == "whole" else None) for name in ("ring", "whole")
    }
    if t + 1 in (10, 100, 250, 500, 750, args.long):
      curve[t + 1] = lat
  print(f"  filled in {time.perf_counter() - t0:.0f} s; one micro-turn at n micro-turns of context (single samples):")
  for n, lat in curve.items():
    print(f"    n={n:5d}  window {lat['ring']:6.1f} ms   window 0 {lat['whole']:6.1f} ms")

  # 1. interleaved: the long sessions against sessions reset to `args.short` micro-turns. Each
  # measured micro-turn follows micro-turns of its own session (whose code and cache are then
  # warm, as in a live session): the short one's 10, and 2 more of the long one.
  longs, shorts = {"ring": [], "whole": []}, {"ring": [], "whole": []}
  for _ in range(args.rounds):
    for long, short in (("ring", "short"), ("whole", "short_whole")):
      sessions[short].reset()
      scripts[short] = Script(c, args.seed + 1)
      for _ in range(args.short):
        step(sessions[short], next_turn(short))
      turn = next_turn(long)  # the same input and answer for both
      shorts[long].append(step(sessions[short], turn))
      for _ in range(2):
        step(sessions[long], next_turn(long))
      longs[long].append(step(sessions[long], turn))
  ratios = {}
  for name, label in (("ring", f"window {c.stream.window}"), ("whole", "window 0")):
    lo, hi = statistics.median(shorts[name]), statistics.median(longs[name])
    ratios[name] = hi / lo
    print(
      f"  {label:12s} {args.short} micro-turns of context {lo:6.1f} ms, {args.long}: {hi:6.1f} ms "
      f"(medians of {args.rounds}) ratio {hi / lo:.2f}"
    )
  return {"ratio": ratios["ring"], "ratio_whole": ratios["whole"], "speedup": speedup}


def budget(name: str, args) -> tuple[float, float]:
  c, model = preset(name)
  session = Session(model, StreamConfig.from_config(c))
  script = Script(c, args.seed)
  for _ in range(2):  # compile
    step(session, script.turn(session._eot))
  session.reset()
  lat = [step(session, script.turn(session._eot)) for _ in range(args.turns)]
  p50, p99 = np.percentile(lat, [50, 99])
  print(
    f"{name}: {args.turns} micro-turns from a fresh session: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(lat):.1f} ms "
    f"({p99 / BUDGET_MS:.0%} of the {BUDGET_MS:.0f} ms budget at p99)"
  )
  return float(p50), float(p99)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--long", type=int, default=1000, help="micro-turns of context of the long sessions (default 1000)")
  p.add_argument("--short", type=int, default=10, help="micro-turns of context of the short sessions (default 10)")
  p.add_argument("--recompute", type=int, default=500, help="context of the recompute comparison (default 500)")
  p.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the context ratio (default 30)")
  p.add_argument("--recompute-rounds", type=int, default=3, help="rounds of the recompute comparison (default 3)")
  p.add_argument("--turns", type=int, default=300, help="micro-turns of each budget session (default 300: 1 minute)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, 1 device")
  found = context_and_recompute(args)
  tiny = budget("sample_cpu", args)
  bench = budget("cpu_bench", args)
  print(f"stream_context_{args.long}_vs_{args.short}_window0 {found['ratio_whole']:.2f}")
  print(f"stream_tiny_p50_ms {tiny[0]:.1f}")
  print(f"stream_cpu_bench_p50_ms {bench[0]:.1f}")
  print(f"stream_cpu_bench_p99_ms {bench[1]:.1f}")
  print(f"stream_context_{args.long}_vs_{args.short} {found['ratio']:.2f} target<=1.5")
  print(f"stream_speedup_vs_recompute_{args.recompute} {found['speedup']:.1f} target>=20")
  print(f"stream_tiny_p99_ms {tiny[1]:.1f} target<=50")


if __name__ == "__main__":
  main()
