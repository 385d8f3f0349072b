"""Evaluation and ablations of a checkpoint: per-stream losses on held-out rows.

  python -m tmlx.eval losses --checkpoint WORKDIR [--data DIR:W,...] [--batches 8]
      [--zero video,user_audio,text] [--disable_experts 0,5] [--flow_steps 10] [--out eval.json]

The checkpoint is restored on the current devices with its own resolved config (its mesh if it
fits them, else replicated). Rows come from the config's data (or --data, a mixture like
data.mixture) with seed `config.seed + --seed_offset` (default 1000), so they are not the rows the
run trained on. Reported: text cross-entropy per text target, flow-matching loss per audio target
(fixed noise draws), the error of mel sampled by the flow head's Euler sampler with --flow_steps
steps against the target (normalized units), and the MoE dropped fraction.

Ablations (any combination):
  --zero video       every patch black (pixels 0)
  --zero user_audio  every AUDIO_IN position the lowest dMel bin (the silence floor)
  --zero text        every TEXT_IN token PAD (typed text and background results)
  --disable_experts  the listed routed experts of every MoE layer are never chosen: tokens go to
                     their next best experts (their router bias is set to -1e9)
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

ABLATIONS = ("video", "user_audio", "text")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tmlx.eval losses", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a workdir or checkpoint directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--data", default=None, help="data mixture 'DIR:W,...' (default: the config's data)")
  p.add_argument("--batches", type=int, default=8, help="global batches to evaluate")
  p.add_argument("--seed_offset", type=int, default=1000, help="rows of seed config.seed + this")
  p.add_argument("--zero", default="", help=f"comma-separated inputs to zero: {', '.join(ABLATIONS)}")
  p.add_argument("--disable_experts", default="", help="comma-separated routed expert ids to route around")
  p.add_argument("--flow_steps", type=int, default=10, help="Euler steps of the sampled-mel error")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  return p.parse_args(argv)


def _ids(text: str, flag: str, choices=None) -> list:
  items = [t.strip() for t in text.split(",") if t.strip()]
  if choices is not None:
    bad = [t for t in items if t not in choices]
    if bad:
      raise SystemExit(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(choices)}")
    return items
  try:
    return [int(t) for t in items]
  except ValueError:
    raise SystemExit(f"{flag}={text!r}: expected comma-separated integers") from None


def ablate(batch: dict, zero: list[str]) -> dict:
  """The batch with the named inputs zeroed (see the module docstring)."""
  from data_pipelines.contract import Kind

  batch = dict(batch)
  kind = batch["kind"]
  if "video" in zero:
    batch["patches"] = np.zeros_like(batch["patches"])
  if "user_audio" in zero:
    batch["dmel"] = np.where((kind == Kind.AUDIO_IN)[..., None, None], 0, batch["dmel"]).astype(batch["dmel"].dtype)
  if "text" in zero:
    batch["tokens"] = np.where(kind == Kind.TEXT_IN, 0, batch["tokens"]).astype(batch["tokens"].dtype)
  return batch


def evaluate(args: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import data_pipelines
  from tmlx import sharding
  from tmlx.inference import load_model
  from tmlx.losses import _gather_positions, _shift_left, _take, audio_targets, loss_sums
  from tmlx.nn.flow_head import sample as flow_sample
  from tmlx.nn.moe import RouterBias
  from tmlx.train import loss_config

  zero = _ids(args.zero, "--zero", ABLATIONS)
  disabled = _ids(args.disable_experts, "--disable_experts")
  try:
    model, config, step = load_model(args.checkpoint, step=args.step)
  except FileNotFoundError as e:
    raise SystemExit(f"--checkpoint: {e}") from None
  num_experts = config.model.moe.num_experts
  if any(not 0 <= e < num_experts for e in disabled):
    raise SystemExit(f"--disable_experts: ids must be in 0..{num_experts - 1}")
  if len(disabled) > num_experts - config.model.moe.num_experts_per_tok:
    raise SystemExit("--disable_experts: too many; each token needs num_experts_per_tok experts left")
  if disabled:
    for _, leaf in nnx.iter_graph(model):
      if isinstance(leaf, RouterBias):
        leaf[...] = leaf[...].at[..., jnp.asarray(disabled)].set(-1e9)
  if args.data:
    config.data.source = "episodes"
    config.data.mixture = args.data
  config.seed = config.seed + args.seed_offset
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  lc = loss_config(config)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch, key):
    with sharding.use_mesh_rules(mesh, rules):
      m = nnx.merge(graphdef, state)
      out = m(batch)
      sums = loss_sums(m, out, batch, key, lc)
      # Sampled mel at the audio targets (gathered first, like the loss) against the targets.
      mask, _ = audio_targets(batch, lc)
      pos, valid = _gather_positions(mask, lc.max_audio_targets)
      target = _take(_shift_left(batch["mel"]), pos).reshape(*pos.shape, -1).astype(jnp.float32)
      sampled = flow_sample(m.flow_head, _take(out.hidden, pos), key, steps=args.flow_steps)
      err = jnp.sum(jnp.mean(jnp.square(sampled - target), axis=-1) * valid)
      return sums, err, jnp.sum(out.moe.dropped), jnp.sum(out.moe.assignments)

  data = iter(
    data_pipelines.make_dataset(
      config, start_step=0, num_steps=args.batches, process_index=jax.process_index(), process_count=jax.process_count()
    )
  )
  row = data_pipelines.row_spec(config)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, len(shape) + 1) for k, (shape, _) in row.fields().items()}
  totals = dict(text_sum=0.0, text_weight=0.0, flow_sum=0.0, flow_count=0.0, sample_err=0.0, dropped=0.0, assigned=0.0)
  for i in range(args.batches):
    local, _ = next(data)
    local = ablate(local, zero)
    batch = {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}
    sums, err, dropped, assigned = jax.device_get(run(state, batch, jax.random.key(i)))
    totals["text_sum"] += float(sums.text_sum)
    totals["text_weight"] += float(sums.text_weight)
    totals["flow_sum"] += float(sums.flow_sum)
    totals["flow_count"] += float(sums.flow_count)
    totals["sample_err"] += float(err)
    totals["dropped"] += float(dropped)
    totals["assigned"] += float(assigned)
  ratio = lambda a, b: totals[a] / totals[b] if totals[b] else float("nan")
  return {
    "checkpoint_step": step,
    "batches": args.batches,
    "zero": zero,
    "disabled_experts": disabled,
    "flow_steps": args.flow_steps,
    "text_targets": totals["text_weight"],
    "audio_targets": totals["flow_count"],
    "text_loss": ratio("text_sum", "text_weight"),
    "flow_loss": ratio("flow_sum", "flow_count"),
    "sampled_mel_mse": ratio("sample_err", "flow_count"),
    "moe_dropped_fraction": ratio("dropped", "assigned"),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  results = evaluate(args)
  for key, value in results.items():
    print(f"{key:22s} {value:.6g}" if isinstance(value, float) else f"{key:22s} {value}")
  if args.out:
    from tmlx import paths

    with paths.open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
