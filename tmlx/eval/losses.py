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

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
from absl import flags

from tmlx import cli

ABLATIONS = ("video", "user_audio", "text")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to evaluate (the flags of the command line, module docstring)."""

  checkpoint: str  # a workdir or checkpoint directory
  step: int | None = None  # checkpoint step (default: the latest)
  data: str | None = None  # data mixture 'DIR:W,...' (default: the config's data)
  batches: int = 8  # global batches to evaluate
  seed_offset: int = 1000  # rows of seed config.seed + this
  zero: str = ""  # comma-separated inputs to zero (ABLATIONS)
  disable_experts: str = ""  # comma-separated routed expert ids to route around
  flow_steps: int = 10  # Euler steps of the sampled-mel error


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


def evaluate(options: Options) -> dict:
  """The losses and errors of the module docstring; a bad option raises SystemExit naming its flag."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import data_pipelines
  from tmlx import sharding
  from tmlx.inference import load_model
  from tmlx.losses import audio_targets, gather_positions, loss_config, loss_sums, shift_left, take_positions
  from tmlx.nn.flow_head import sample as flow_sample
  from tmlx.nn.moe import RouterBias

  zero = _ids(options.zero, "--zero", ABLATIONS)
  disabled = _ids(options.disable_experts, "--disable_experts")
  try:
    model, config, step = load_model(options.checkpoint, step=options.step)
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
  if options.data:
    config.data.source = "episodes"
    config.data.mixture = options.data
  config.seed = config.seed + options.seed_offset
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  lc = loss_config(config)
  graphdef, state = nnx.split(model)

  @jax.jit
  def evaluate_batch(state, batch, key):
    with sharding.use_mesh_rules(mesh, rules):
      m = nnx.merge(graphdef, state)
      out = m(batch)
      sums = loss_sums(m, out, batch, key, lc)
      # Sampled mel at the audio targets (gathered first, like the loss) against the targets.
      mask, _ = audio_targets(batch, lc)
      pos, valid = gather_positions(mask, lc.max_audio_targets)
      target = take_positions(shift_left(batch["mel"]), pos).reshape(*pos.shape, -1).astype(jnp.float32)
      sampled = flow_sample(m.flow_head, take_positions(out.hidden, pos), key, steps=options.flow_steps)
      err = jnp.sum(jnp.mean(jnp.square(sampled - target), axis=-1) * valid)
      return sums, err, jnp.sum(out.moe.dropped), jnp.sum(out.moe.assignments)

  processes = dict(process_index=jax.process_index(), process_count=jax.process_count())
  data = iter(data_pipelines.make_dataset(config, start_step=0, num_steps=options.batches, **processes))
  row = data_pipelines.row_spec(config)
  batch_sh = {k: sharding.batch_sharding(mesh, rules, len(shape) + 1) for k, (shape, _) in row.fields().items()}
  totals = dict(text_sum=0.0, text_weight=0.0, flow_sum=0.0, flow_count=0.0, sample_err=0.0, dropped=0.0, assigned=0.0)
  for i in range(options.batches):
    local, _ = next(data)
    local = ablate(local, zero)
    batch = {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in local.items()}
    sums, err, dropped, assigned = jax.device_get(evaluate_batch(state, batch, jax.random.key(i)))
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
    "batches": options.batches,
    "zero": zero,
    "disabled_experts": disabled,
    "flow_steps": options.flow_steps,
    "text_targets": totals["text_weight"],
    "audio_targets": totals["flow_count"],
    "text_loss": ratio("text_sum", "text_weight"),
    "flow_loss": ratio("flow_sum", "flow_count"),
    "sampled_mel_mse": ratio("sample_err", "flow_count"),
    "moe_dropped_fraction": ratio("dropped", "assigned"),
  }


def write_results(results: dict, out: str | None = None) -> None:
  """Prints the results, one per line, and writes them as JSON to `out` if given."""
  for key, value in results.items():
    print(f"{key:22s} {value:.6g}" if isinstance(value, float) else f"{key:22s} {value}")
  if out:
    from tmlx import paths

    with paths.open(out, "w") as f:
      json.dump(results, f, indent=1)


# The command line (module docstring); its flags are defined when it runs, not at import.

PROG = "python -m tmlx.eval losses"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("checkpoint", None, "A workdir or checkpoint directory.", required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string("data", None, "Data mixture 'DIR:W,...' (default: the config's data).", flag_values=fv)
  flags.DEFINE_integer("batches", 8, "Global batches to evaluate.", flag_values=fv)
  flags.DEFINE_integer("seed_offset", 1000, "Rows of seed config.seed + this.", flag_values=fv)
  flags.DEFINE_string("zero", "", f"Comma-separated inputs to zero: {', '.join(ABLATIONS)}.", flag_values=fv)
  flags.DEFINE_string("disable_experts", "", "Comma-separated routed expert ids to route around.", flag_values=fv)
  flags.DEFINE_integer("flow_steps", 10, "Euler steps of the sampled-mel error.", flag_values=fv)
  flags.DEFINE_string("out", None, "Also write the results as JSON here.", flag_values=fv)


def _options(fv: flags.FlagValues, args: list[str]) -> Options:
  if args:
    cli.fail(PROG, f"takes no positional arguments; got {args}")
  return Options(**{field.name: fv[field.name].value for field in dataclasses.fields(Options)})


def parse_args(argv: Sequence[str]) -> Options:
  """The Options of a command line (its arguments after `python -m tmlx.eval losses`); a bad one
  ends the process as the command does."""
  fv = flags.FlagValues()
  define_flags(fv)
  return _options(fv, cli.parse(PROG, [PROG, *argv], fv))


def run(fv: flags.FlagValues, args: list[str]) -> int:
  """`evaluate`s what the parsed command line asks for and `write_results`; a bad option ends it
  in one line."""
  options = _options(fv, args)
  with cli.one_line_exits(PROG):
    results = evaluate(options)
  write_results(results, fv.out)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `python -m tmlx.eval losses ARGS` in this process on `argv` (ARGS; default
  sys.argv[1:]); returns the exit status."""
  return cli.call(PROG, define_flags, run, argv)


if __name__ == "__main__":
  cli.app_main(PROG, define_flags, run)
