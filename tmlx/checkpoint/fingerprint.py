"""Fingerprints of arrays: two wrapping uint32 sums per array that do not depend on its sharding
(see the package docstring), and the names of the leaves they are kept under."""

from __future__ import annotations

import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

_GOLDEN = 2654435761  # odd multiplier that spreads element indices over 32 bits
_MASK = np.uint64(2**32 - 1)


# A fingerprint of an array x is the pair (S, G * W + S) mod 2**32, with S = sum(bits(x)) and
# W = sum(bits(x) * flat index), bits(x) the element bit patterns zero-extended to uint32. Both sums
# are additive over any split of the array, so each shard contributes its part (with its global
# offsets) and the total is the same whatever the sharding. Two ways to compute the same numbers:
# on the host over the shards' memory (CPU arrays: numpy reductions, several times faster there
# than XLA's) and on the devices (accelerators: no copy to the host).


def _unsigned_view(a: np.ndarray) -> np.ndarray:
  if a.dtype == np.bool_:
    return a.view(np.uint8)
  if a.dtype.itemsize > 4:
    raise ValueError(f"cannot fingerprint a {a.dtype} array (wider than 32 bits)")
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _shard_sums(data: np.ndarray, offsets: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int]:
  """(S, W) mod 2**32 of one block of an array of `shape` that starts at `offsets`.

  The block's last-axis runs are contiguous in the flat index: with row sums r_k, column sums c_j
  and g_k the flat index of run k's first element, W = sum_k g_k r_k + sum_j j c_j. Two passes
  over the data; the rest is on vectors."""
  u = _unsigned_view(data if data.flags.c_contiguous else data.copy(order="C"))
  if u.ndim == 0:
    return int(u), 0
  runs = u.reshape(-1, u.shape[-1])
  row = runs.sum(axis=1, dtype=np.uint32).astype(np.uint64)
  col = runs.sum(axis=0, dtype=np.uint32).astype(np.uint64)
  strides = np.cumprod((shape[1:] + (1,))[::-1], dtype=np.uint64)[::-1] & _MASK  # row-major
  first = np.full(row.shape, np.uint64(offsets[-1]), np.uint64)
  if u.ndim > 1:
    lead = np.indices(u.shape[:-1], dtype=np.uint64).reshape(u.ndim - 1, -1)
    for d in range(u.ndim - 1):
      first += (lead[d] + np.uint64(offsets[d])) * strides[d]
  first &= _MASK
  # uint64 sums wrap modulo 2**64, which keeps them right modulo 2**32.
  w = np.sum(first * row, dtype=np.uint64) + np.sum(np.arange(col.size, dtype=np.uint64) * col, dtype=np.uint64)
  return int(np.sum(row, dtype=np.uint64) & _MASK), int(w & _MASK)


def _blocks(i: int, x) -> list[tuple[int, np.ndarray, tuple[int, ...], tuple[int, ...]]]:
  """(leaf index, host view, offsets, global shape) of the parts of `x` this process holds, each
  element counted once. The views are zero-copy, and while they live JAX does not donate the
  buffers under them (a train step then allocates afresh, as it does while Orbax writes)."""
  if not isinstance(x, jax.Array):
    return [(i, np.asarray(x), (0,) * np.ndim(x), tuple(np.shape(x)))]
  out = []
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      offsets = tuple(sl.indices(n)[0] for sl, n in zip(shard.index, x.shape))
      out.append((i, np.asarray(shard.data), offsets, tuple(x.shape)))
  return out


_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
  if name not in _POOLS:
    _POOLS[name] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"tmlx-{name}")
  return _POOLS[name]


def _local_sums(blocks: list, n: int) -> np.ndarray:
  """[n, 2] uint64 (S, W) partial sums of this process's blocks, over a thread per core (numpy
  releases the GIL in the reductions)."""
  pool = _pool("fingerprint", max(1, os.cpu_count() or 1))
  tasks = [(i, pool.submit(_shard_sums, data, off, shape)) for i, data, off, shape in blocks]
  sums = np.zeros((n, 2), np.uint64)
  for i, task in tasks:
    sums[i] += np.array(task.result(), np.uint64)
  return sums


def _combine(sums: np.ndarray) -> np.ndarray:
  s, w = sums[:, 0] & _MASK, sums[:, 1] & _MASK
  return np.stack([s, (w * np.uint64(_GOLDEN) + s) & _MASK], axis=1).astype(np.uint32)


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32, same shape (elementwise: the sharding is kept)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize * 8
  if width > 32:
    raise ValueError(f"cannot fingerprint a {x.dtype} array (wider than 32 bits)")
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  if x.dtype != unsigned:
    x = jax.lax.bitcast_convert_type(x, unsigned)
  return x.astype(jnp.uint32)


def _device_fingerprint(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  # Row-major element index from per-dimension iotas: no reshape, so no resharding of the array.
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * np.uint32(stride % 2**32)
    stride *= bits.shape[d]
  weighted = bits * (index * np.uint32(_GOLDEN) + np.uint32(1))
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


_device_fingerprints = jax.jit(lambda leaves: [_device_fingerprint(x) for x in leaves])


def _on_host(leaves) -> bool:
  return all(not isinstance(x, jax.Array) or next(iter(x.sharding.device_set)).platform == "cpu" for x in leaves)


def fingerprints_async(state, on_host: bool | None = None) -> concurrent.futures.Future:
  """A future of `fingerprints(state)` that does on the calling thread only what must happen in
  program order (taking views of the shards, or dispatching the device computation), and the rest
  in a background thread. With several processes and CPU arrays the cross-process sum is a
  collective, so it all happens here."""
  paths, leaves = _paths_and_leaves(state)
  on_host = _on_host(leaves) if on_host is None else on_host
  if on_host and jax.process_count() > 1:
    done = concurrent.futures.Future()
    done.set_result(fingerprints(state, on_host=True))
    return done
  if on_host:
    blocks = [block for i, x in enumerate(leaves) for block in _blocks(i, x)]
    finish = lambda: _combine(_local_sums(blocks, len(leaves)))
  else:
    prints = _device_fingerprints(list(leaves))  # dispatched now, fetched in the background
    finish = lambda: np.asarray(jax.device_get(prints))
  return _pool("fingerprint-save", 1).submit(lambda: _named(paths, finish()))


def fingerprints(state, on_host: bool | None = None) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of every array of `state`, the same on every mesh and process
  count. Computed on the host when every array lives in CPU memory (or `on_host`), else on the
  devices where the arrays live."""
  paths, leaves = _paths_and_leaves(state)
  if not (_on_host(leaves) if on_host is None else on_host):
    return _named(paths, np.asarray(jax.device_get(_device_fingerprints(list(leaves)))))
  sums = _local_sums([block for i, x in enumerate(leaves) for block in _blocks(i, x)], len(leaves))
  if jax.process_count() > 1:
    sums = multihost_utils.process_allgather(sums).sum(axis=0, dtype=np.uint64)
  return _named(paths, _combine(sums))


def _paths_and_leaves(state) -> tuple[tuple, tuple]:
  pairs = jax.tree.leaves_with_path(state)
  return tuple(p for p, _ in pairs), tuple(x for _, x in pairs)


def _named(paths, prints: np.ndarray) -> dict[str, list[int]]:
  return {leaf_name(path): [int(v) for v in fp] for path, fp in zip(paths, prints)}


def leaf_name(path) -> str:
  """'params/blocks/attn/wq' for a key path, whatever containers (dataclass, dict, tuple) hold it,
  so that a tree read back from the checkpoint's own metadata gets the same names."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")
