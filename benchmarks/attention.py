"""Blockwise attention against the materialized one: compiled temporary memory and fwd+bwd time.

  python benchmarks/attention.py        # about two minutes on 2 cores

Both are tmlx.nn.attention.attend on the same packed rows (three segments and padding, causal),
differentiated with respect to q, k and v: 'dense' materializes the fp32 logits [B, K, G, S, S]
and the mask, 'blockwise' (tmlx.nn.blockwise) computes them a block at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

HELP = """\
Memory: XLA's temporary bytes of the compiled fwd+bwd program (memory_analysis(); arguments and
outputs are the same for both and left out), at --memory-len positions for blockwise ÷ dense
(target <= 0.25), and blockwise at --growth-lens, the longer ÷ the shorter (target <= 4.5 for a
4x longer row: linear; materialized logits would grow 16x). Programs are compiled, not run.

Time: jax.jit(grad) of both at --time-len positions, alternated round by round, medians of
--repeats rounds; blockwise ÷ dense (target <= 1.3). Both are first checked to agree.

The output ends with one line per headline figure: '<name> <value> target<op><value>'.
"""


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2, help="rows B (default 2)")
  p.add_argument("--heads", type=int, default=8, help="query heads N (default 8)")
  p.add_argument("--kv-heads", type=int, default=2, help="kv heads K (default 2)")
  p.add_argument("--head-dim", type=int, default=64, help="head dim H (default 64)")
  p.add_argument("--block", type=int, default=512, help="blockwise block size (default 512, as model.attention_block)")
  p.add_argument("--window", type=int, default=0, help="sliding window; 0 causal (default 0)")
  p.add_argument("--memory-len", type=int, default=4096, help="S of the memory ratio (default 4096)")
  p.add_argument("--growth-lens", type=int, nargs=2, default=(2048, 8192), help="S of the growth ratio")
  p.add_argument("--time-len", type=int, default=1024, help="S of the time ratio (default 1024)")
  p.add_argument("--dtype", default="float32", help="q, k, v dtype (default float32: bf16 is slower on CPU)")
  p.add_argument("--repeats", type=int, default=9, help="timing rounds (default 9)")
  return p.parse_args(argv)


def inputs(args, s: int, abstract: bool = False):
  b, n, kv, h, dt = args.batch, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype)
  shapes = [(b, s, n, h), (b, s, kv, h), (b, s, kv, h)]
  seg = np.zeros((b, s), np.int32)
  seg[:, : s // 3], seg[:, s // 3 : s - s // 8], seg[:, s - s // 8 : s - 7] = 1, 2, 3
  if abstract:
    return [jax.ShapeDtypeStruct(x, dt) for x in shapes] + [jax.ShapeDtypeStruct((b, s), jnp.int32)]
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=x), dt) for x in shapes] + [jnp.asarray(seg)]


def step(args, impl: str):
  from tmlx.nn import attention

  def loss(q, k, v, seg):
    out = attention.attend(q, k, v, seg, impl=impl, window=args.window, block=args.block)
    return jnp.sum(jnp.where((seg > 0)[..., None, None], out, 0).astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def temp_bytes(args, impl: str, s: int) -> int:
  return step(args, impl).lower(*inputs(args, s, abstract=True)).compile().memory_analysis().temp_size_in_bytes


def timed(fn, call_args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*call_args))
  return time.perf_counter() - t0


def main(argv=None) -> None:
  args = parse_args(argv)
  print(f"devices: {jax.devices()[0].device_kind}; B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim}")
  print(f"block {args.block}, window {args.window}, {args.dtype}")

  dense_mem, block_mem = (temp_bytes(args, impl, args.memory_len) for impl in ("dense", "blockwise"))
  short, long = (temp_bytes(args, "blockwise", s) for s in args.growth_lens)
  print(f"temp bytes at S={args.memory_len}: dense {dense_mem / 2**20:.1f} MiB, blockwise {block_mem / 2**20:.1f} MiB")
  (s0, s1), mib = args.growth_lens, 2**20
  print(f"blockwise temp bytes: S={s0} {short / mib:.1f} MiB, S={s1} {long / mib:.1f} MiB")

  call_args = inputs(args, args.time_len)
  fns = {impl: step(args, impl) for impl in ("dense", "blockwise")}
  got = {impl: jax.block_until_ready(fn(*call_args)) for impl, fn in fns.items()}  # compile, and check
  for a, b in zip(got["blockwise"], got["dense"]):
    scale = float(jnp.abs(b).max())
    if not float(jnp.abs(a - b).max()) <= 1e-3 * scale:
      raise SystemExit(f"blockwise and dense gradients disagree at S={args.time_len}")
  times = {impl: [] for impl in fns}
  for _ in range(args.repeats):
    for impl, fn in fns.items():
      times[impl].append(timed(fn, call_args))
  med = {impl: statistics.median(t) for impl, t in times.items()}
  print(f"fwd+bwd at S={args.time_len}: dense {med['dense'] * 1e3:.1f} ms, blockwise {med['blockwise'] * 1e3:.1f} ms")

  print(f"attention_blockwise_vs_dense_temp_{args.memory_len} {block_mem / dense_mem:.3f} target<=0.25")
  print(
    f"attention_blockwise_temp_growth_{args.growth_lens[0]}_to_{args.growth_lens[1]} {long / short:.2f} target<=4.5"
  )
  print(f"attention_blockwise_vs_dense_time_{args.time_len} {med['blockwise'] / med['dense']:.3f} target<=1.3")


if __name__ == "__main__":
  main()
