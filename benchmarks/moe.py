"""MoE forward+backward time ÷ a dense SwiGLU FFN with the same active parameters and tokens.

  python benchmarks/moe.py                      # local, all_to_all and one-hot: about a minute on 2 cores
  python benchmarks/moe.py --transport ragged   # also the ragged transport (slow on CPU; for GPUs)

Each candidate is timed as jax.jit(value_and_grad) of a scalar loss of the layer output w.r.t. the
input and every parameter, in fp32, interleaved with its dense reference in the same process; the
table quotes medians over --repeats rounds, and the output ends with one line per headline figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from experiments import base
from tmlx import sharding
from tmlx.nn.common import Dtypes
from tmlx.nn.moe import MoE, MoEConfig, capacity, route, swiglu

# Headline targets (ratio of medians, lower is better). None: informational, no target.
TARGETS = {"local": 1.5, "all_to_all": 1.5, "onehot": None, "ragged": None}
DEFAULT_CANDIDATES = ("local", "all_to_all", "onehot")

HELP = """\
Times MoE forward+backward against a dense SwiGLU FFN with the same active parameters and the
same tokens: E experts of hidden size F, top-k, versus one SwiGLU of hidden size k·F. With
--capacity-factor 1 the expert buffers hold exactly k·tokens slots, so both do the same matmul
FLOPs; the ratio measures what routing, dispatch and combine cost on top. Shared experts are
off (num_shared_experts=0) so only routed experts are compared. Each batch row is one routing
group, as in tmlx.

Candidates (each against the dense FFN on the same devices, interleaved round by round):
  local       tmlx.nn.moe.MoE, transport='local', on 1 device. Target <= 1.5.
  all_to_all  tmlx.nn.moe.MoE, transport='all_to_all', on a mesh of --expert-shards fake CPU
              devices (expert axis); the dense FFN runs data-parallel on the same mesh. Target
              <= 1.5: on fake CPU devices the exchange is a memory copy inside one host and the
              devices share the same cores as the dense run, so the only cost over 'local' is
              that copy and the shard_map reshapes; a real interconnect is not measured here.
  onehot      GShard-style baseline written here: one_hot/cumsum dispatch and combine tensors
              [B, S, E, C] and einsum dispatch/combine, same router, k and capacity rule.
              Informational (no target); an earlier one-hot version was quoted at 13-19x and an
              untuned sort+gather capacity version at about 2x on this machine.
  ragged      (only with --transport ragged) transport='ragged' (jax.lax.ragged_dot), 1 device;
              informational: ragged_dot is ~13x slower than a dense matmul on XLA:CPU.

The targets assume the default sizes and --capacity-factor 1 (matched FLOPs); dropless or
larger factors give the experts proportionally more rows and a proportionally larger ratio.
Every candidate's output is first checked against 'local' (same parameters and input).
The output ends with one line per candidate: '<name> <value> target<op><value>', or
'<name> <value>' with no target for the informational ones.
"""


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num-experts", type=int, default=8, help="routed experts E (default 8)")
  p.add_argument("--top-k", type=int, default=2, help="experts per token k (default 2)")
  p.add_argument("--d-model", type=int, default=512, help="model width D (default 512)")
  p.add_argument("--d-ff", type=int, default=1024, help="hidden size F of one expert; dense uses k·F (default 1024)")
  p.add_argument("--batch", type=int, default=8, help="rows B = routing groups (default 8)")
  p.add_argument("--seq-len", type=int, default=512, help="tokens per row S (default 512)")
  p.add_argument(
    "--capacity-factor",
    type=float,
    default=1.0,
    help="capacity per expert and row = cf·S·k/E; <= 0: dropless (default 1)",
  )
  p.add_argument(
    "--expert-shards",
    type=int,
    default=2,
    help="fake CPU devices in the all_to_all mesh (its expert axis); 2 suits 2 cores (default 2)",
  )
  p.add_argument(
    "--transport",
    action="append",
    default=[],
    choices=("local", "all_to_all", "onehot", "ragged"),
    help="add a candidate to the defaults (local, all_to_all, onehot); repeatable, e.g. --transport ragged",
  )
  p.add_argument("--only", action="store_true", help="run only the --transport candidates, not the defaults")
  p.add_argument("--platform", default="cpu", help="JAX platform to run on (default cpu; e.g. gpu)")
  p.add_argument("--repeats", type=int, default=11, help="interleaved timing rounds; medians over them (default 11)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per function after compiling (default 2)")
  return p.parse_args(argv)


# --- Functions under test -----------------------------------------------------------------------


def _loss(y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


def onehot_moe(params, x: jax.Array, k: int, cap: int) -> jax.Array:
  """GShard-style MoE [B, S, D] → [B, S, D]: dense one-hot dispatch and combine tensors [B, S, E, C].

  Same router and capacity rule as tmlx (all first choices of a row, then the second ones, each by
  position); the experts run expert-major [E, B·C, D] like tmlx's buffers.
  """
  b, s, d = x.shape
  num_experts = params["router"].shape[-1]
  r = route(jnp.einsum("bsd,de->bse", x, params["router"]), k)
  filled = jnp.zeros((b, 1, num_experts), jnp.int32)  # slots taken by earlier choices
  dispatch = jnp.zeros((b, s, num_experts, cap), x.dtype)
  combine = jnp.zeros((b, s, num_experts, cap), x.dtype)
  for j in range(k):
    chosen = jax.nn.one_hot(r.experts[..., j], num_experts, dtype=jnp.int32)  # [B, S, E]
    pos = jnp.cumsum(chosen, axis=1) - 1 + filled
    kept = chosen * (pos < cap)
    filled = filled + jnp.sum(chosen, axis=1, keepdims=True)
    slot = jax.nn.one_hot(jnp.sum(pos * kept, axis=-1), cap, dtype=x.dtype)  # [B, S, C]
    d_j = kept.astype(x.dtype)[..., None] * slot[:, :, None, :]
    dispatch = dispatch + d_j
    combine = combine + d_j * r.weights[..., j, None, None].astype(x.dtype)
  buf = jnp.einsum("bsec,bsd->ebcd", dispatch, x).reshape(num_experts, b * cap, d)
  h = jax.nn.silu(jnp.einsum("etd,edf->etf", buf, params["w_gate"]))
  h = h * jnp.einsum("etd,edf->etf", buf, params["w_up"])
  out = jnp.einsum("etf,efd->etd", h, params["w_down"]).reshape(num_experts, b, cap, d)
  return jnp.einsum("bsec,ebcd->bsd", combine, out)


def mesh_of(devices, expert: int):
  c = base.get_config()
  c.mesh.update(dict(data=1, fsdp=1, expert=expert, tensor=1))
  return sharding.make_mesh(c.mesh, devices=devices), sharding.rules_table(c.mesh.rules)


def build_moe(args, transport: str) -> MoE:
  cfg = MoEConfig(
    num_experts=args.num_experts,
    num_experts_per_tok=args.top_k,
    num_shared_experts=0,
    d_ff=args.d_ff,
    capacity_factor=args.capacity_factor,
    renormalize=True,
    transport=transport,
  )
  with nnx.use_eager_sharding(False):
    return MoE(args.d_model, cfg, rngs=nnx.Rngs(0), dtypes=Dtypes())


def moe_candidate(args, transport: str, devices, x, mask):
  """(forward, step, args) of tmlx's MoE with `transport` on a mesh over `devices`."""
  moe = build_moe(args, transport)
  mesh, table = mesh_of(devices, expert=len(devices))
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  params = jax.device_put(nnx.to_pure_dict(params), sharding.state_shardings(nnx.state(moe, nnx.Param), mesh, table))
  batch = sharding.batch_sharding(mesh, table, 3)
  call_args = (params, jax.device_put(x, batch), jax.device_put(mask, sharding.batch_sharding(mesh, table, 2)))

  def forward(p, x, mask):
    with sharding.use_mesh_rules(mesh, table):
      return nnx.merge(graphdef, p, rest)(x, mask)

  def loss(p, x, mask):
    return _loss(forward(p, x, mask)[0])

  return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), call_args


def onehot_candidate(args, devices, x, mask):
  del mask  # every token is real in this benchmark
  moe = build_moe(args, "local")
  params = jax.device_put(nnx.to_pure_dict(nnx.state(moe, nnx.Param)), devices[0])
  cap = capacity(moe.cfg, args.seq_len)
  forward = lambda p, x: onehot_moe(p, x, args.top_k, cap)
  step = jax.value_and_grad(lambda p, x: _loss(forward(p, x)), argnums=(0, 1))
  return jax.jit(forward), jax.jit(step), (params, jax.device_put(x, devices[0]))


def dense_reference(args, devices, x):
  """value_and_grad of the dense SwiGLU (hidden k·F) on [B·S, D] tokens, data-parallel over `devices`."""
  d, f = args.d_model, args.top_k * args.d_ff
  keys = jax.random.split(jax.random.key(2), 3)
  w = {
    "gate": jax.random.normal(keys[0], (d, f)) * d**-0.5,
    "up": jax.random.normal(keys[1], (d, f)) * d**-0.5,
    "down": jax.random.normal(keys[2], (f, d)) * f**-0.5,
  }
  mesh, table = mesh_of(devices, expert=len(devices))
  w = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
  x = jax.device_put(x, sharding.batch_sharding(mesh, table, 3))

  # Rows flattened to [B·S, D] (swiglu does it too): a [B, S, D] form took twice as long on XLA:CPU,
  # which would flatter every MoE ratio.
  def loss(w, x):
    return _loss(swiglu(x.reshape(-1, d), w["gate"], w["up"], w["down"]))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (w, x)


# --- Timing -------------------------------------------------------------------------------------


def time_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
  """{name: (fn, args)} → {name: [seconds per call]}, one call of each per round, order rotating."""
  for fn, a in fns.values():
    for _ in range(1 + warmup):  # the first call compiles
      jax.block_until_ready(fn(*a))
  names = list(fns)
  times = {n: [] for n in names}
  for r in range(repeats):
    for n in names[r % len(names) :] + names[: r % len(names)]:
      fn, a = fns[n]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*a))
      times[n].append(time.perf_counter() - t0)
  return times


def main(argv=None) -> None:
  args = parse_args(argv)
  candidates = list(dict.fromkeys(([] if args.only else list(DEFAULT_CANDIDATES)) + args.transport))
  ep = args.expert_shards
  if args.platform == "cpu":
    # Fake CPU devices must be requested before JAX starts its backend.
    jax.config.update("jax_num_cpu_devices", max(ep, 1) if "all_to_all" in candidates else 1)
  devices = jax.devices(args.platform)
  one = devices[:1]
  if "all_to_all" in candidates and len(devices) < ep:
    print(f"skipping all_to_all: --expert-shards {ep} needs {ep} {args.platform} devices, found {len(devices)}")
    candidates.remove("all_to_all")

  b, s, d = args.batch, args.seq_len, args.d_model
  x = jax.random.normal(jax.random.key(1), (b, s, d), jnp.float32)
  mask = jnp.ones((b, s), bool)
  cap = capacity(build_moe(args, "local").cfg, s)
  print(
    f"E={args.num_experts} top-{args.top_k} D={d} F={args.d_ff} (dense k·F={args.top_k * args.d_ff}) "
    f"tokens={b}x{s}={b * s} fp32 capacity_factor={args.capacity_factor} (C={cap} per expert and row) "
    f"platform={args.platform} all_to_all mesh expert={ep}"
  )

  # Candidates and their dense references; each output is checked against 'local' first.
  fns, forwards = {}, {}
  for name in candidates:
    if name == "onehot":
      fwd, step, a = onehot_candidate(args, one, x, mask)
      forwards[name] = lambda fwd=fwd, a=a: fwd(*a)
    else:
      fwd, step, a = moe_candidate(args, name, devices[:ep] if name == "all_to_all" else one, x, mask)
      forwards[name] = lambda fwd=fwd, a=a: fwd(*a)[0]
      if name == "local":
        stats = fwd(*a)[1]
        print(f"routing: {float(stats.dropped / stats.assignments):.1%} of assignments dropped for capacity")
    fns[name] = (step, a)
  fns["dense"] = dense_reference(args, one, x)
  if "all_to_all" in candidates:
    fns["dense_mesh"] = dense_reference(args, devices[:ep], x)

  if "local" in forwards:
    reference = np.asarray(forwards["local"]())
  else:
    fwd, _, a = moe_candidate(args, "local", one, x, mask)
    reference = np.asarray(fwd(*a)[0])
  for name, fwd in forwards.items():
    err = float(np.max(np.abs(np.asarray(fwd()) - reference)))
    if err > 1e-3:
      raise SystemExit(f"{name}: output differs from the 'local' transport by {err:.2e} (max abs); not timing it")
  print(f"outputs of {', '.join(forwards)} agree (max abs difference <= 1e-3)")

  times = time_interleaved(fns, args.repeats, args.warmup)
  med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
  flops = 3 * 3 * 2 * b * s * d * args.top_k * args.d_ff  # 3 matmuls, forward + 2x backward
  print(f"\ndense fwd+bwd: {flops / med['dense'] / 1e6:.0f} GFLOP/s on 1 device ({args.repeats} rounds)")
  print(f"{'candidate':<12} {'devices':>7} {'median ms':>10} {'dense ms':>10} {'ratio':>7}  paired ratios min..max")
  lines = []
  for name in candidates:
    ref = "dense_mesh" if name == "all_to_all" else "dense"
    ratio = med[name] / med[ref]
    paired = [t / r for t, r in zip(times[name], times[ref])]
    n_dev = ep if name == "all_to_all" else 1
    print(
      f"{name:<12} {n_dev:>7} {med[name]:>10.1f} {med[ref]:>10.1f} {ratio:>7.2f}  {min(paired):.2f}..{max(paired):.2f}"
    )
    target = TARGETS[name]
    lines.append(f"moe_{name}_vs_dense_ratio {ratio:.2f}" + ("" if target is None else f" target<={target}"))
  print()
  print("\n".join(lines))


if __name__ == "__main__":
  main()
