"""MFU of the tmlx MoE train step against a plain dense JAX transformer, on one CPU device.

Run:  python benchmarks/mfu.py             (2-4 minutes on 2 shared cores)
      python benchmarks/mfu.py --diagnose  (also times parts of the step, about 4 more minutes)

In one process, in interleaved rounds, it measures
  (a) the fp32 matmul peak of this CPU (`tmlx.flops.measure_cpu_peak`),
  (b) the real tmlx train step (`tmlx.train.train_step`, jitted, state donated) of the
      `experiments/cpu_bench.py` preset on a batch from its configured (synthetic) source, and
  (c) the train step of a dense transformer written here in plain jax.numpy + optax, with the
      same active parameters per token: same d_model, layers, heads (GQA, RoPE, q/k norm), a
      SwiGLU FFN of width k·d_ff (+ the shared experts' width), same seq_len, batch and vocab,
      the same clipping + AdamW. Its matmuls take [B·S, D] token rows: the fastest way to write
      it for XLA:CPU, whose backward pass of [B, S, D] einsums transposes activations around
      every weight-gradient matmul (--diagnose shows that variant too).
MFU = model FLOPs per step / step time / peak, the peak measured right before and after that
candidate's steps (the 2 cores are shared with other work, so the peak drifts). The MoE step's
FLOPs are `tmlx.flops.flops_per_token` ('model' count: top-k experts, causal attention at
(S+1)/2 keys, stems and heads); the dense step's are counted with the same conventions
(3 x the forward matmuls; attention at (S+1)/2 keys; the embedding is a gather). Figures are
medians over rounds; the ratio is the median of the per-round ratios of the two MFUs.

--diagnose adds, in the same rounds: the dense reference with [B, S, D] einsums, tmlx steps with
a part cut to its minimum (heads on one target slot each; one video patch slot), the optimizer
updates alone (their cost follows total, not active, parameters), and one MoE layer alone
against the dense SwiGLU FFN of the same active width (forward + backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO_TARGET = 0.9  # the MoE step should lose at most 10% of the dense step's MFU
MFU_TARGET = 0.45  # 0.9 x the ~0.5 of the measured fp32 peak that the dense reference reaches here


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="experiments/cpu_bench.py", help="preset file, 1 device (default: %(default)s)")
  p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of (a), (b), (c) (default: %(default)s)")
  p.add_argument("--steps", type=int, default=1, help="timed steps of each model per round (default: %(default)s)")
  p.add_argument("--peak-size", type=int, default=2048, help="matmul size of the peak (default: %(default)s)")
  p.add_argument("--diagnose", action="store_true", help="also time parts of the model (see above)")
  return p.parse_args(argv)


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a preset file (relative paths: from here or from the repository root)."""
  import importlib.util

  if not os.path.exists(path):
    path = os.path.join(ROOT, path)
  spec = importlib.util.spec_from_file_location("bench_preset", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# --- Timing ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
  """A jitted step with its state; `run` times steps between two peak measurements."""

  name: str
  flops_per_step: float
  step: Callable  # state -> next state (or the outputs, for stateless steps); blocked on here
  state: object
  compile_s: float = 0.0
  times: list[float] = dataclasses.field(default_factory=list)  # median step time of each round
  peaks: list[float] = dataclasses.field(default_factory=list)  # mean peak before and after them

  def warm_up(self) -> None:
    t0 = time.perf_counter()
    self.state = jax.block_until_ready(self.step(self.state))
    self.compile_s = time.perf_counter() - t0

  def run(self, steps: int, measure_peak: Callable[[], float]) -> None:
    """Times `steps` steps between two peak measurements (their mean is this round's peak)."""
    before = measure_peak()
    ts = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state = jax.block_until_ready(self.step(self.state))
      ts.append(time.perf_counter() - t0)
    self.peaks.append((before + measure_peak()) / 2)
    self.times.append(statistics.median(ts))

  def mfus(self) -> list[float]:
    """MFU of each round, against the peak measured next to it."""
    return [self.flops_per_step / t / p for t, p in zip(self.times, self.peaks)]


# --- (b) the tmlx train step --------------------------------------------------------------------


def tmlx_candidate(name: str, config: ml_collections.ConfigDict) -> Candidate:
  from tmlx import flops, sharding, train
  from tmlx.state import state_spec

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_table(config.mesh.rules)
  spec = state_spec(config, mesh, rules)
  state = jax.jit(spec.init, out_shardings=spec.shardings)()
  batch = synthetic_batch(config)
  sc = train.step_config(config, spec, mesh, rules)
  fn = jax.jit(functools.partial(train.train_step, sc=sc), donate_argnums=(0,))
  step = lambda s: fn(s, batch)[0]
  tokens = config.data.global_batch_size * config.data.seq_len
  return Candidate(name, flops.flops_per_token(config) * tokens, step, state)


def synthetic_batch(config: ml_collections.ConfigDict) -> dict:
  """The global batch of step 0 from the configured source."""
  import data_pipelines

  return {k: jnp.asarray(v) for k, v in data_pipelines.stacked_rows(config).items()}


# --- (c) the dense reference, plain JAX ---------------------------------------------------------
# Dimensions: B batch, S sequence, D model, N query heads, K kv heads, G = N / K, H head dim,
# F FFN hidden, V vocab, L layers.


@dataclasses.dataclass(frozen=True)
class DenseShape:
  batch: int
  seq_len: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  vocab_size: int

  @classmethod
  def like(cls, config: ml_collections.ConfigDict) -> DenseShape:
    """The dense model with the MoE preset's active parameters per token."""
    m = config.model
    return cls(
      batch=config.data.global_batch_size,
      seq_len=config.data.seq_len,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim,
      d_ff=(m.moe.num_experts_per_tok + m.moe.num_shared_experts) * m.moe.d_ff,
      vocab_size=m.vocab_size,
    )

  def flops_per_token(self) -> float:
    """Training FLOPs per position: 3 x (2 per multiply-add) over the matmuls, causal attention
    at (S+1)/2 keys per query (the conventions of tmlx.flops); the embedding is a gather."""
    d, n, kv, h, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
    per_layer = 2 * d * h * (2 * n + 2 * kv) + 2 * 3 * d * f + 2 * (2 * n * h * (self.seq_len + 1) / 2)
    return 3 * (self.num_layers * per_layer + 2 * d * self.vocab_size)


def _rms_norm(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta=10_000.0):
  """x [B, S, heads, H], half-split layout."""
  h = x.shape[-1]
  freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angles = positions[:, :, None, None] * freq
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense_init(shape: DenseShape, key) -> dict:
  d, n, kv, h, f, v, nl = (
    shape.d_model,
    shape.num_heads,
    shape.num_kv_heads,
    shape.head_dim,
    shape.d_ff,
    shape.vocab_size,
    shape.num_layers,
  )
  keys = iter(jax.random.split(key, 16))
  normal = lambda s, fan_in: jax.random.normal(next(keys), s, jnp.float32) * fan_in**-0.5
  return {
    "embed": normal((v, d), 1),
    "layers": {
      "attn_norm": jnp.ones((nl, d)),
      "wq": normal((nl, d, n, h), d),
      "wk": normal((nl, d, kv, h), d),
      "wv": normal((nl, d, kv, h), d),
      "q_norm": jnp.ones((nl, h)),
      "k_norm": jnp.ones((nl, h)),
      "wo": normal((nl, n, h, d), n * h),
      "mlp_norm": jnp.ones((nl, d)),
      "w_gate": normal((nl, d, f), d),
      "w_up": normal((nl, d, f), d),
      "w_down": normal((nl, f, d), f),
    },
    "final_norm": jnp.ones((d,)),
    "unembed": normal((d, v), d),
  }


def dense_loss(params: dict, tokens: jax.Array, shape: DenseShape, rows: bool = True) -> jax.Array:
  """Next-token cross-entropy of a pre-norm GQA + SwiGLU decoder (layers under lax.scan).

  With `rows` the residual stream is [B·S, D] and every weight matmul contracts one row axis;
  otherwise it is [B, S, D], as in tmlx's einsums, and XLA:CPU transposes activations around the
  weight-gradient matmuls (which then contract B and S).
  """
  b, s = tokens.shape
  k = shape.num_kv_heads
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), (b, s))
  causal = jnp.tril(jnp.ones((s, s), bool))
  x = params["embed"][tokens.reshape(-1) if rows else tokens]
  mm = lambda x, w, axes=1: jnp.tensordot(x, w, axes=axes)  # last `axes` dims of x with the first of w

  def block(x, p):
    y = _rms_norm(x, p["attn_norm"])
    q = _rope(_rms_norm(mm(y, p["wq"]).reshape(b, s, -1, shape.head_dim), p["q_norm"]), positions)
    kk = _rope(_rms_norm(mm(y, p["wk"]).reshape(b, s, k, -1), p["k_norm"]), positions)
    v = mm(y, p["wv"]).reshape(b, s, k, -1)
    n, h = q.shape[2], q.shape[3]
    q = q.reshape(b, s, k, n // k, h)
    logits = jnp.einsum("bskgh,btkh->bkgst", q, kk) * h**-0.5
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgst,btkh->bskgh", jax.nn.softmax(logits, axis=-1), v)
    x = x + mm(out.reshape(*x.shape[:-1], n, h), p["wo"], 2)
    y = _rms_norm(x, p["mlp_norm"])
    return x + mm(jax.nn.silu(mm(y, p["w_gate"])) * mm(y, p["w_up"]), p["w_down"]), None

  x, _ = jax.lax.scan(block, x, params["layers"])
  logits = mm(_rms_norm(x, params["final_norm"]), params["unembed"]).reshape(b, s, -1)
  labels = jnp.roll(tokens, -1, axis=1)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))


def dense_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.chain(
    optax.clip_by_global_norm(o.clip_norm),
    optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
  )


def dense_candidate(config: ml_collections.ConfigDict, rows: bool = True) -> Candidate:
  shape = DenseShape.like(config)
  tx = dense_optimizer(config)
  params = jax.jit(functools.partial(dense_init, shape))(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (shape.batch, shape.seq_len), 0, shape.vocab_size)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state, tokens):
    params, opt_state = state
    grads = jax.grad(dense_loss)(params, tokens, shape, rows)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  name = "dense reference" if rows else "dense reference, [B, S, D] einsums"
  flops = shape.flops_per_token() * shape.batch * shape.seq_len
  return Candidate(name, flops, lambda s: train_step(s, tokens), (params, tx.init(params)))


# --- --diagnose: parts of the step ---------------------------------------------------------------


def optimizer_candidate(name: str, tx: optax.GradientTransformation, params) -> Candidate:
  """The optimizer update alone (clipping + AdamW, state donated) on gradients of ones."""
  grads = jax.tree.map(jnp.ones_like, params)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def update(state):
    params, opt_state = state
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return Candidate(name, 0.0, update, (params, tx.init(params)))


def ffn_candidates(config: ml_collections.ConfigDict) -> list[Candidate]:
  """Forward + backward (input and weight gradients) of one tmlx MoE layer and of a dense
  SwiGLU FFN of the same active width on [B·S, D] rows; FLOPs of the routed and shared experts
  and the router by tmlx.flops' 'model' count, 3 x forward for the dense FFN."""
  from flax import nnx

  from tmlx.flops import flop_breakdown
  from tmlx.nn.model import ModelConfig
  from tmlx.nn.moe import MoE

  mc = ModelConfig.from_config(config.model)
  b, s, d = config.data.global_batch_size, config.data.seq_len, mc.d_model
  x = jax.random.normal(jax.random.key(2), (b, s, d), jnp.float32)
  mask = jnp.ones((b, s), bool)
  with nnx.use_eager_sharding(False):
    moe = MoE(d, mc.moe, rngs=nnx.Rngs(0), dtypes=mc.dtypes)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

  def moe_loss(params, x):
    y, stats = nnx.merge(graphdef, params, rest)(x, mask)
    return jnp.sum(y * y) + stats.load_balance_loss + stats.z_loss

  def ffn_loss(p, x):
    x = x.reshape(-1, d)
    return jnp.sum(jnp.square((jax.nn.silu(x @ p[0]) * (x @ p[1])) @ p[2]))

  moe_grad = jax.jit(jax.grad(moe_loss, argnums=(0, 1)))
  ffn_grad = jax.jit(jax.grad(ffn_loss, argnums=(0, 1)))
  f = DenseShape.like(config).d_ff
  keys = jax.random.split(jax.random.key(3), 3)
  ffn_params = [jax.random.normal(k, shape) * shape[0] ** -0.5 for k, shape in zip(keys, [(d, f), (d, f), (f, d)])]
  fb = flop_breakdown(config)
  moe_flops = (fb.routed_experts + fb.shared_experts + fb.router) / mc.num_layers * b * s
  return [
    Candidate("MoE layer alone (fwd+bwd)", moe_flops, lambda _: moe_grad(params, x), None),
    Candidate("dense SwiGLU FFN (fwd+bwd)", 3 * 2 * 3 * d * f * b * s, lambda _: ffn_grad(ffn_params, x), None),
  ]


def _override(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def diagnose_candidates(config: ml_collections.ConfigDict, moe: Candidate, dense: Candidate) -> list[Candidate]:
  """The dense reference as tmlx writes its matmuls; tmlx steps with a part cut to its minimum;
  the optimizer updates alone; the MoE layer alone against the dense FFN."""
  from tmlx.optim import make_optimizer

  tmlx_tx, _ = make_optimizer(config.optimizer, config.train.num_steps)  # as tmlx.state.state_spec
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the steps donate their own state
  no_heads = _override(config, loss__max_text_target_fraction=0.0, loss__max_audio_target_fraction=0.0)
  one_patch = _override(config, data__max_patches=1, data__frame_height=40, data__frame_width=40)
  return [
    dense_candidate(config, rows=False),
    tmlx_candidate("tmlx, heads on 1 target slot", no_heads),
    tmlx_candidate("tmlx, 1 video patch slot", one_patch),
    optimizer_candidate("tmlx optimizer update alone", tmlx_tx, copy(moe.state.params)),
    optimizer_candidate("dense optimizer update alone", dense_optimizer(config), copy(dense.state[0])),
  ] + ffn_candidates(config)


# --- Main ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
  args = parse_args(argv)
  config = load_config(args.config)
  jax.config.update("jax_num_cpu_devices", max(config.runtime.cpu_devices, 1))
  from tmlx import flops
  from tmlx.config import validate

  validate(config, jax.device_count())
  if jax.device_count() != 1:
    sys.exit(f"benchmarks/mfu.py measures one device; {args.config} has {jax.device_count()} (runtime.cpu_devices)")
  m = config.model
  print(
    f"{args.config}: d_model {m.d_model}, {m.num_layers} layers, {m.moe.num_experts} experts top-"
    f"{m.moe.num_experts_per_tok} (d_ff {m.moe.d_ff}, {m.moe.num_shared_experts} shared), "
    f"seq {config.data.seq_len}, batch {config.data.global_batch_size}, {m.compute_dtype}, "
    f"{jax.devices()[0].device_kind} x{os.cpu_count()} cores",
    flush=True,
  )
  moe = tmlx_candidate("tmlx MoE step (cpu_bench)", config)
  dense = dense_candidate(config)
  candidates = [moe, dense] + (diagnose_candidates(config, moe, dense) if args.diagnose else [])
  for c in candidates:
    c.warm_up()
    print(f"compiled {c.name} in {c.compile_s:.1f}s", flush=True)

  measure_peak = functools.partial(flops.measure_cpu_peak, m.compute_dtype, size=args.peak_size, repeats=3)
  for r in range(args.rounds):
    # Each candidate's steps between two peak measurements of their own (the 2 cores are shared:
    # load drifts), and the order alternated, so no candidate always runs first or last.
    for c in candidates if r % 2 == 0 else candidates[::-1]:
      c.run(args.steps, measure_peak)
    print(
      f"round {r + 1}/{args.rounds}: "
      + ", ".join(f"{c.name} {c.times[-1]:.3f}s (peak {c.peaks[-1] / 1e9:.0f} GFLOP/s)" for c in candidates[:2]),
      flush=True,
    )

  peaks = [p for c in candidates for p in c.peaks]
  print()
  print(
    f"fp32 matmul peak ({args.peak_size}^2, {len(peaks)} measurements): median {statistics.median(peaks) / 1e9:.0f}, "
    f"range {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s"
  )
  print(f"{'':36s} {'GFLOP/step':>10s} {'step s':>7s} {'GFLOP/s':>8s} {'MFU':>6s} {'MFU range':>11s}")
  for c in candidates:
    t, u = statistics.median(c.times), c.mfus()
    if c.flops_per_step:
      rate = f"{c.flops_per_step / 1e9:10.1f} {t:7.3f} {c.flops_per_step / t / 1e9:8.1f} {statistics.median(u):6.3f}"
      print(f"{c.name:36s} {rate} {min(u):5.3f}-{max(u):5.3f}")
    else:  # no matmul FLOPs: time only
      print(f"{c.name:36s} {'-':>10s} {t:7.3f}")
  parts = flops.flop_breakdown(config).as_dict()
  total = sum(parts.values())
  print("tmlx model FLOPs by part: " + ", ".join(f"{k} {v / total:.1%}" for k, v in parts.items() if v))
  ratios = [a / b for a, b in zip(moe.mfus(), dense.mfus())]
  print(f"MoE / dense MFU per round: {' '.join(f'{x:.2f}' for x in ratios)}")
  print(f"cpu_bench_mfu {statistics.median(moe.mfus()):.3f} target>={MFU_TARGET}")
  print(f"dense_reference_mfu {statistics.median(dense.mfus()):.3f}")
  print(f"moe_vs_dense_mfu_ratio {statistics.median(ratios):.3f} target>={RATIO_TARGET}")


if __name__ == "__main__":
  main()
