"""Checkpoint save and restore throughput against raw disk I/O, and how long an async save blocks.

Run:  python benchmarks/checkpoint.py              (1 GiB state, 4 rounds: under a minute on 2 shared
                                                   cores; peak RSS about 4 GB)
      python benchmarks/checkpoint.py --gib 4 --rounds 6 --dir /some/disk

In one process, on --devices fake CPU devices (a mesh fsdp x tensor, arrays sharded by the default
logical-axis rules: embed -> fsdp, heads/mlp/vocab -> tensor), it builds a train-state-like dict of
float32 arrays of at least --gib GiB (params, Adam mu and nu of a stacked-layer transformer with
D=1024, SwiGLU F=2816, GQA kv width 256; layers and vocabulary chosen to fill the size; random
normal values, so that compression gains little), and then, in --rounds interleaved rounds
(the order of candidate and reference flips every round; os.sync() before each write, untimed),
measures:

  save     tmlx.checkpoint.Checkpointer(async_save=True).save(...) and then .wait(): the time
           until the checkpoint is committed (Orbax finalized the step directory);
  write    the same number of bytes written with os.write to one new file in the same directory,
           then fsync of the file and of the directory (tensorstore's file kvstore fsyncs too);
  restore  Checkpointer.restore onto the same shardings, including its fingerprint verification;
  read     that file read back sequentially with readinto into a reused 64 MiB buffer.
Before each read, the file (or every file of the checkpoint step) is fsynced and dropped from
the page cache with posix_fadvise(POSIX_FADV_DONTNEED); mincore then reports how much of it is
still resident (printed). A virtual disk may still be cached by its host, below this machine:
that affects candidate and reference alike.

Throughputs count the state's array bytes (logical size) for both; the checkpoint's on-disk size
is printed too. Headline save and restore ratios (MB/s of checkpoint / MB/s of raw) are geometric
means of the per-round ratios: on a virtual disk whichever writes second in a round can pay for
the first one's data (the host flushes it then), and such a factor cancels between the rounds of
either order. The blocking fraction is the median over rounds of (time until save() returns) /
(time until wait() returns): save() returns once it has taken views of the shards for the
fingerprints (computed in the background) and Orbax has the arrays in host memory and has
started its background write, so the training loop is blocked that long. The breakdown splits
it into our part (fingerprint setup + metadata) and the Orbax CheckpointManager.save call, timed
by wrapping that call (the restore likewise into the Orbax restore and the fingerprint
verification); an informational line gives Orbax's figures without our part. One untimed save +
restore runs first (Orbax's first-use costs). Disk use: --rounds + 1 checkpoints and one raw file,
all removed at the end.

The output ends with one line per headline figure: '<name> <value> target<op><value>'.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

SAVE_TARGET = 0.5
RESTORE_TARGET = 0.5
BLOCKING_TARGET = 0.1

CHUNK = 64 * 2**20  # bytes per os.write / readinto of the raw reference
D_MODEL, D_FF, D_KV = 1024, 2816, 256


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gib", type=float, default=1.0, help="state size in GiB, at least (default: %(default)s)")
  p.add_argument(
    "--rounds",
    type=int,
    default=4,
    help="interleaved timing rounds, an even number so that each order comes as often (default: %(default)s)",
  )
  p.add_argument(
    "--dir",
    default=None,
    help="directory on the disk to measure; a fresh subdirectory is made in it and removed at the end "
    "(default: the system temp dir)",
  )
  p.add_argument(
    "--devices", type=int, default=8, help="fake CPU devices the state is sharded over (default: %(default)s)"
  )
  return p.parse_args(argv)


# --- The state ------------------------------------------------------------------------------------


def param_shapes(gib: float) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """{name: (shape, logical axes)} of a stacked-layer transformer whose params + Adam mu + nu in
  float32 take at least `gib` GiB: about 60% in the layers, the rest in embedding + output head."""
  d, f, kv = D_MODEL, D_FF, D_KV
  layer = {
    "attn/wq": ((d, d), ("embed", "heads")),
    "attn/wk": ((d, kv), ("embed", "kv_heads")),
    "attn/wv": ((d, kv), ("embed", "kv_heads")),
    "attn/wo": ((d, d), ("heads", "embed")),
    "attn_norm": ((d,), ("embed",)),
    "mlp/w_gate": ((d, f), ("embed", "mlp")),
    "mlp/w_up": ((d, f), ("embed", "mlp")),
    "mlp/w_down": ((f, d), ("mlp", "embed")),
    "mlp_norm": ((d,), ("embed",)),
  }
  per_layer = sum(math.prod(s) for s, _ in layer.values())
  target = math.ceil(gib * 2**30 / (3 * 4))  # parameters, each stored 3 times (params, mu, nu) in fp32
  layers = max(1, round(0.6 * target / per_layer))
  vocab = max(256, math.ceil(max(0, target - layers * per_layer - d) / (2 * d) / 256) * 256)
  shapes = {f"blocks/{k}": ((layers, *s), ("layers", *a)) for k, (s, a) in layer.items()}
  shapes["embed"] = ((vocab, d), ("vocab", "embed"))
  shapes["head"] = ((d, vocab), ("embed", "vocab"))
  shapes["final_norm"] = ((d,), ("embed",))
  return shapes


RULES = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def make_state(gib: float, mesh):
  """{'step', 'params', 'opt': {'mu', 'nu'}} of random fp32 arrays, each created sharded on `mesh`."""
  shapes = param_shapes(gib)

  def nest(flat):
    out = {}
    for name, v in flat.items():
      *parents, leaf = name.split("/")
      node = out
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = v
    return out

  rng = np.random.default_rng(0)
  trees = []
  for _ in range(3):
    flat = {}
    for name, (shape, axes) in shapes.items():
      sharding = NamedSharding(mesh, PartitionSpec(*(RULES.get(a) for a in axes)))
      host = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
      flat[name] = jax.block_until_ready(jax.device_put(host, sharding))
    trees.append(nest(flat))
  step = jax.device_put(np.int32(1000), NamedSharding(mesh, PartitionSpec()))
  return {"step": step, "params": trees[0], "opt": {"mu": trees[1], "nu": trees[2]}}


# --- Raw file I/O and the page cache --------------------------------------------------------------


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def raw_write(path: str, nbytes: int, chunk: memoryview) -> float:
  """Seconds to write `nbytes` (repeating `chunk`) to a new file and fsync it and its directory."""
  t0 = time.perf_counter()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    left = nbytes
    while left:
      pos = 0
      n = min(left, len(chunk))
      while pos < n:
        pos += os.write(fd, chunk[pos:n])
      left -= n
    os.fsync(fd)
  finally:
    os.close(fd)
  fsync_dir(os.path.dirname(path))
  return time.perf_counter() - t0


def raw_read(path: str, buf: memoryview) -> tuple[float, int]:
  """(seconds, bytes) to read the file sequentially into `buf`, chunk after chunk."""
  t0 = time.perf_counter()
  total = 0
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
      total += n
  return time.perf_counter() - t0, total


def files_under(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  return [os.path.join(d, name) for d, _, names in os.walk(path) for name in names]


def drop_cache(path: str) -> None:
  """fsync and evict from the page cache every file at or under `path` (POSIX_FADV_DONTNEED
  evicts clean pages only, hence the fsync first)."""
  for name in files_under(path):
    fd = os.open(name, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _libc():
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    return libc
  except (OSError, AttributeError):
    return None


_LIBC = _libc()


def resident_fraction(path: str) -> float | None:
  """Fraction of the pages of the files at or under `path` that are in the page cache (mincore
  on a read-only mapping, which faults nothing in); None where mincore is not available."""
  import mmap

  if _LIBC is None:
    return None
  page = mmap.PAGESIZE
  resident = total = 0
  for name in files_under(path):
    size = os.path.getsize(name)
    if size == 0:
      continue
    pages = (size + page - 1) // page
    fd = os.open(name, os.O_RDONLY)
    try:
      addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if addr in (None, ctypes.c_void_p(-1).value):
        return None
      try:
        vec = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(addr, size, vec) != 0:
          return None
        resident += sum(b & 1 for b in vec)
        total += pages
      finally:
        _LIBC.munmap(addr, size)
    finally:
      os.close(fd)
  return resident / total if total else 0.0


def du(path: str) -> int:
  return sum(os.path.getsize(name) for name in files_under(path))


# --- Main -----------------------------------------------------------------------------------------


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.rounds % 2:
    raise SystemExit(f"--rounds={args.rounds}: use an even number, so that each order comes as often")
  # Orbax adds the time spent in an explicit wait_until_finished() to its "waiting for previous
  # save" warning at the next save; that wait is ours, outside the save, so the warning is noise.
  logging.getLogger("absl").addFilter(lambda record: "Waiting for previous save" not in record.getMessage())
  jax.config.update("jax_num_cpu_devices", args.devices)
  from tmlx import checkpoint as ckpt_lib
  from tmlx import sharding

  devices = jax.devices()
  tensor = 2 if len(devices) % 2 == 0 else 1
  mesh_cfg = {"data": 1, "fsdp": len(devices) // tensor, "expert": 1, "tensor": tensor}
  mesh = sharding.make_mesh(mesh_cfg, devices)

  base = args.dir or tempfile.gettempdir()
  os.makedirs(base, exist_ok=True)
  work = tempfile.mkdtemp(prefix="tmlx_ckpt_bench_", dir=base)
  try:
    run(args, work, mesh, mesh_cfg, ckpt_lib)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def run(args, work: str, mesh, mesh_cfg: dict, ckpt_lib) -> None:
  t0 = time.perf_counter()
  state = make_state(args.gib, mesh)
  leaves = jax.tree.leaves(state)
  nbytes = sum(x.nbytes for x in leaves)
  mb = nbytes / 1e6
  print(
    f"state: {len(leaves)} float32/int32 arrays, {nbytes / 2**30:.3f} GiB ({mb:.0f} MB), sharded over "
    f"{len(jax.devices())} {jax.devices()[0].platform} devices (mesh {dict(mesh.shape)}); "
    f"built in {time.perf_counter() - t0:.1f} s"
  )
  print(f"directory: {work}")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  config = {"benchmark": "checkpoint", "gib": args.gib}
  data = {"step": 1000, "seed": 0, "spec_hash": "benchmark"}

  ckpt_dir = os.path.join(work, "checkpoints")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=args.rounds + 2, async_save=True)
  # Time the Orbax call inside Checkpointer.save/.restore, to split them from the fingerprints.
  inner = {}

  def timed(name, fn):
    def call(*a, **kw):
      t = time.perf_counter()
      try:
        return fn(*a, **kw)
      finally:
        inner[name] = time.perf_counter() - t

    return call

  ckpt._manager.save = timed("orbax_save", ckpt._manager.save)
  ckpt._manager.restore = timed("orbax_restore", ckpt._manager.restore)

  raw_path = os.path.join(work, "raw.bin")
  chunk = memoryview(np.random.default_rng(0).bytes(CHUNK))
  read_buf = memoryview(bytearray(CHUNK))

  def save(step):
    t = time.perf_counter()
    ckpt.save(step, state, config, mesh_shape=dict(mesh.shape), data=data)
    blocked = time.perf_counter() - t
    ckpt.wait()
    return blocked, time.perf_counter() - t, inner["orbax_save"]

  def restore(step):
    where = os.path.join(ckpt_dir, str(step))
    drop_cache(where)
    resident = resident_fraction(where)
    t = time.perf_counter()
    out = ckpt.restore(step, abstract)
    jax.block_until_ready(out)
    total = time.perf_counter() - t
    del out
    return total, inner["orbax_restore"], resident

  t = time.perf_counter()
  save(0)
  restore(0)
  print(f"warm-up save + restore: {time.perf_counter() - t:.1f} s; checkpoint on disk {du(ckpt_dir) / 1e6:.0f} MB")
  t = time.perf_counter()
  ckpt_lib.fingerprints(state)
  t = time.perf_counter() - t
  print(f"tmlx.checkpoint.fingerprints(state) alone: {t:.2f} s ({mb / t:.0f} MB/s)")

  rows = []
  print(
    f"\n{'round':>5} {'save s':>7} {'block s':>7} {'fp s':>6} {'orbax s':>7} {'write s':>7} "
    f"{'restore s':>9} {'orbax s':>7} {'read s':>7} {'resident ckpt/raw':>17}"
  )
  for r in range(1, args.rounds + 1):
    row = {}
    order = (0, 1) if r % 2 else (1, 0)
    for which in order:  # writes: candidate and reference in this round's order
      os.sync()  # untimed: no dirty data of the previous write left for this one to flush
      if which == 0:
        row["block"], row["save"], row["orbax_save"] = save(r)
      else:
        row["write"] = raw_write(raw_path, nbytes, chunk)
    for which in order:  # reads, same order
      if which == 0:
        row["restore"], row["orbax_restore"], row["res_ckpt"] = restore(r)
      else:
        drop_cache(raw_path)
        row["res_raw"] = resident_fraction(raw_path)
        row["read"], got = raw_read(raw_path, read_buf)
        assert got == nbytes, (got, nbytes)
    os.remove(raw_path)
    row["fp"] = row["block"] - row["orbax_save"]
    rows.append(row)
    res = "/".join("n/a" if row[k] is None else f"{row[k]:.0%}" for k in ("res_ckpt", "res_raw"))
    print(
      f"{r:>5} {row['save']:7.2f} {row['block']:7.2f} {row['fp']:6.2f} {row['orbax_save']:7.2f} "
      f"{row['write']:7.2f} {row['restore']:9.2f} {row['orbax_restore']:7.2f} {row['read']:7.2f} {res:>17}"
    )
  ckpt.close()

  med = {k: statistics.median(row[k] for row in rows) for k in ("save", "block", "fp", "orbax_save", "write")}
  med.update({k: statistics.median(row[k] for row in rows) for k in ("restore", "orbax_restore", "read")})
  # Geometric means of the per-round ratios: a position effect that multiplies the time of whoever
  # goes second in a round cancels between the rounds of either order.
  gmean = lambda xs: math.exp(statistics.fmean(math.log(x) for x in xs))
  save_ratio = gmean(row["write"] / row["save"] for row in rows)
  restore_ratio = gmean(row["read"] / row["restore"] for row in rows)
  blocking = statistics.median(row["block"] / row["save"] for row in rows)
  print(f"\nmedians over {args.rounds} rounds, {mb:.0f} MB each way (headline ratios: geometric means of the rounds'):")
  print(f"  checkpoint save (save + wait)       {mb / med['save']:8.0f} MB/s  ({med['save']:.2f} s)")
  print(f"  raw write (write + fsync)           {mb / med['write']:8.0f} MB/s  ({med['write']:.2f} s)")
  print(f"  checkpoint restore (incl. verify)   {mb / med['restore']:8.0f} MB/s  ({med['restore']:.2f} s)")
  print(f"  raw read (page cache dropped)       {mb / med['read']:8.0f} MB/s  ({med['read']:.2f} s)")
  print(
    f"  save blocks the caller {med['block']:.2f} s: fingerprints + metadata {med['fp']:.2f} s, "
    f"Orbax CheckpointManager.save call {med['orbax_save']:.2f} s"
  )
  print(
    f"  restore {med['restore']:.2f} s: Orbax CheckpointManager.restore {med['orbax_restore']:.2f} s, "
    f"fingerprint verification {med['restore'] - med['orbax_restore']:.2f} s"
  )
  orbax_save = med["save"] - med["fp"]
  print(
    f"  without the fingerprints (informational): Orbax save {mb / orbax_save:.0f} MB/s, "
    f"{med['write'] / orbax_save:.2f} x raw write, blocking {med['orbax_save'] / orbax_save:.2f} of it; "
    f"Orbax restore {mb / med['orbax_restore']:.0f} MB/s, {med['read'] / med['orbax_restore']:.2f} x raw read"
  )
  print(
    f"  paired ratios min..max: save/write {min(r['write'] / r['save'] for r in rows):.2f}.."
    f"{max(r['write'] / r['save'] for r in rows):.2f}, restore/read {min(r['read'] / r['restore'] for r in rows):.2f}.."
    f"{max(r['read'] / r['restore'] for r in rows):.2f}"
  )
  print()
  print(f"checkpoint_save_vs_raw_write {save_ratio:.3g} target>={SAVE_TARGET:g}")
  print(f"checkpoint_restore_vs_raw_read {restore_ratio:.3g} target>={RESTORE_TARGET:g}")
  print(f"async_save_blocking_fraction {blocking:.3g} target<={BLOCKING_TARGET:g}")


if __name__ == "__main__":
  main()
