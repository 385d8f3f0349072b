"""Orbax checkpoints: the train state, the resolved config and a metadata record, with integrity
checks.

Restore precedence (what tmlx.train.run does, in order):
  1. the latest checkpoint in `<workdir>/checkpoints` that is complete and whose arrays match
     their fingerprints (a rerun or preemption resume); a step that fails either check is skipped
     with the reason logged, moved aside (`<step>.unusable-<time>`) and the one before it is tried;
  2. `config.init.resume_from`: the full state (step, parameters, optimizer) of another run's
     latest usable checkpoint;
  3. `config.init.params_from`: only the parameters of another run's latest checkpoint, with a
     fresh optimizer; parameters it lacks (or that `config.init.reinit` names) are initialized and
     listed in the log, a parameter that grew in one dimension (more experts, a larger vocabulary)
     gets the saved values first, and any other shape change is an error naming the parameter;
  4. scratch: a fresh, sharded initialization.
A restore always targets the current mesh's shardings (the abstract state carries them), so a
checkpoint is resharded on read; restoring without target shardings is refused.

Items of a checkpoint step (no pickle anywhere):
  state   the TrainState arrays (Orbax PyTree item: tensorstore OCDBT, uncompressed)
  config  the resolved config (JSON)
  meta    JSON: tmlx version, step, mesh shape, process count, data position (step, seed and
          data-spec hash) and a fingerprint per array
A fingerprint is two wrapping uint32 sums over the array's bit patterns, one of them weighted by
element index: integer sums do not depend on the reduction order, so the fingerprint of an array
is the same on every mesh and process count, and any changed element changes it.

Inspect a checkpoint directory:  python -m tmlx.checkpoint inspect PATH [--step=N] [--verify]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging as std_logging
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store  # the store Orbax's default handler has

import tmlx
from tmlx import paths

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


# Orbax's handlers for the state's leaves, but with replica-parallel saving (each replica of a
# replicated shard writes a slice of it) only where a slice is at least this big. Cutting a slice
# is a device program compiled per array shape: for the norm scales, biases and small tables it
# costs more than it saves, and the first save of a process compiled one for each of them (about
# 12 s for the tiny config on CPU; on a pod, a compile per distinct small shape on every host).
REPLICA_PARALLEL_MIN_SLICE_BYTES = 16 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  scalar = ocp.type_handlers.ScalarHandler()
  array = ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(),
    min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
  )
  return ocp.type_handlers.create_type_handler_registry(
    (int, scalar),
    (float, scalar),
    (bytes, scalar),
    (np.number, scalar),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (jax.Array, array),
    (str, ocp.type_handlers.StringHandler()),
  )


class _MetaHandler(ocp.JsonCheckpointHandler):
  """The `meta` item: JSON whose values may be futures (the fingerprints), awaited in Orbax's
  background commit, so that a save blocks the train loop only for what must happen in order."""

  async def async_save(self, directory, item=None, args=None):
    meta = dict(args.item)

    async def write():
      for key, value in meta.items():
        if isinstance(value, concurrent.futures.Future):
          meta[key] = await asyncio.wrap_future(value)
      if jax.process_index() == 0:
        (directory / _META_FILE).write_text(json.dumps(meta))

    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="tmlx_meta_save")]


_META_FILE = "metadata"  # the file name JsonCheckpointHandler reads back


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
  item: dict


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
  pass


def leaf_name(path) -> str:
  """'params/blocks/attn/wq' for a key path, whatever containers (dataclass, dict, tuple) hold it,
  so that a tree read back from the checkpoint's own metadata gets the same names."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def checkpoint_dir(path: str) -> str:
  """The checkpoint directory of `path`, a workdir or a checkpoint directory."""
  inner = paths.join(path, "checkpoints")
  return inner if paths.is_dir(inner) else path


def open_existing(path: str, what: str = "checkpoint") -> Checkpointer:
  """A read-only Checkpointer of `path` (a workdir or checkpoint directory) that must exist and
  hold at least one step: NoCheckpointError, a FileNotFoundError (one line, naming `what` and the path) otherwise.
  Nothing is created, so a mistyped path stays a mistake and does not become an empty directory."""
  directory = checkpoint_dir(path)
  if not paths.is_dir(directory):
    raise NoCheckpointError(f"{what} {path}: no such directory (expected a workdir or its checkpoints directory)")
  ckpt = Checkpointer(directory, keep=1, async_save=False, read_only=True)
  if not ckpt.all_steps():
    ckpt.close()
    raise NoCheckpointError(f"{what} {path}: no checkpoint steps in {directory}")
  return ckpt


def _require_shardings(abstract) -> None:
  for path, leaf in jax.tree.leaves_with_path(abstract):
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
        f"refusing to restore {jax.tree_util.keystr(path)} without a target sharding: pass "
        "ShapeDtypeStructs with the current mesh's shardings"
      )


class CheckpointError(RuntimeError):
  """No usable checkpoint although some exist."""


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, no permission, storage unreachable): the run stops, since going on
  would train steps that no checkpoint can bring back."""


class _OrbaxWriteTaskNoise(std_logging.Filter):
  """Drops asyncio's "... exception was never retrieved" reports of Orbax's write tasks:
  when a save fails, every array's write fails with the same error, which the save reports once."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    unretrieved = "exception was never retrieved" in message.split("\n", 1)[0]  # Task, Future, _GatheringFuture
    return not (unretrieved and ("orbax" in message or "OCDBT" in message))


std_logging.getLogger("asyncio").addFilter(_OrbaxWriteTaskNoise())


_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\](?=\s*\[|\s*$)")
_OS_ERROR = re.compile(r"[^:\[\]]*\[os_error_code=[^\]]*\]")  # "File too large [os_error_code='27']"


def _reason(e: BaseException) -> str:
  """The innermost message of an exception chain, in one line."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ or e.__context__
  text = " ".join(str(e).split())
  text = _SPEC.sub("", text)  # tensorstore appends the whole spec it opened: noise in one line
  if len(text) > 600:  # tensorstore's messages name the file first; keep that and the OS error
    os_errors = _OS_ERROR.findall(text)
    text = f"{text[:250]} ... {os_errors[-1].strip() if os_errors else text[-300:]}"
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "Too many open files", "Cannot allocate memory")


def _transient(e: BaseException) -> bool:
  """Whether a failed read says more about the storage or the machine than about the checkpoint
  (out of memory or file handles, a store that did not answer): such a step is not quarantined."""
  if isinstance(e, (MemoryError, TimeoutError, ConnectionError)):
    return True
  text = str(e)
  return any(marker in text for marker in _TRANSIENT)


class NoCheckpointError(FileNotFoundError):
  """A path given to read checkpoints from is not there, or holds none."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the config's state: the config is wrong (or the
  workdir is another run's), not the checkpoint, so nothing is moved aside."""


class Checkpointer:
  """Saves {state, config, meta} into `directory` when asked (the train loop decides when),
  keeping the latest `keep` steps and, with `keep_every` > 0, every step divisible by it."""

  def __init__(self, directory: str, *, keep: int, async_save: bool, keep_every: int = 0, read_only: bool = False):
    self.directory = paths.absolute(directory)  # a gs:// URL as it is: Orbax writes there itself
    policies = [checkpoint_managers.LatestN(keep)]
    if keep_every > 0:
      policies.append(checkpoint_managers.EveryNSteps(keep_every))
    if read_only:  # another run's checkpoints: never create, clean up or delete anything there
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      )
    self._saving: int | None = None  # the step of the latest save started
    self._failed = ""  # the message of a save failure, once one was seen
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        # Uncompressed: zstd saves ~8% of the bytes of trained float weights, and costs more in
        # CPU time than the disk time it saves (benchmarks/checkpoint.py).
        "state": ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=_type_handlers()),
        "config": ocp.JsonCheckpointHandler(),
        "meta": _MetaHandler(_META_FILE),
      },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, config: dict, *, mesh_shape: dict | None = None, data: dict | None = None):
    """Starts a save of `state` (a pytree of global arrays), the resolved `config` and the metadata.

    `data` is the data position ({"step", "seed", "spec_hash"}). The fingerprints are of the arrays
    as they are now; they are computed in the background with the rest of an async save.
    """
    meta = {
      "tmlx_version": tmlx.__version__,
      "step": int(step),
      "mesh": dict(mesh_shape or {}),
      "process_count": jax.process_count(),
      "data": data or {},
      "fingerprints": fingerprints_async(state),
    }
    with self._save_errors():
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config), meta=_MetaSave(meta)
        ),
        force=True,
      )
    self._saving = step

  @contextlib.contextmanager
  def _save_errors(self):
    """A failure of the save in flight (reported by Orbax at the next save or wait) or of this one
    becomes one CheckpointSaveError naming the step, the directory and the cause."""
    if self._failed:
      raise CheckpointSaveError(self._failed)
    try:
      yield
    except Exception as e:
      self._failed = f"saving checkpoint step {self._saving} in {self.directory} failed: {_reason(e)}"
      raise CheckpointSaveError(self._failed) from None

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs) and
    checks every array against its fingerprint; raises CheckpointError naming the first mismatch."""
    _require_shardings(abstract_state)
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        ),
        meta=_MetaRestore(),
      ),
    )
    verify(out.state, out.meta, f"{self.directory}/{step}")
    return out.state

  def restore_latest(
    self, abstract_state, quarantine: bool = True, config: dict | None = None
  ) -> tuple[object, int] | None:
    """The newest step that restores and verifies, falling back past bad steps (each logged);
    None when there is no checkpoint; CheckpointError when none of them is usable. Unusable steps
    are moved aside when `quarantine` (the run's own directory), left alone otherwise.

    A step whose arrays are readable but do not fit `abstract_state` (another tree, shape or
    dtype) raises IncompatibleCheckpointError before anything is moved: the message names the first
    misfit array and, given the resolved `config`, the fields in which it differs from the
    checkpoint's own config."""
    failures = []
    found = None
    for step in reversed(self.all_steps()):
      try:
        misfit = self._misfit(step, abstract_state)
      except Exception as e:  # unreadable tree metadata: unusable, handled with the restore below
        misfit = None
        logging.debug("tree metadata of step %d unreadable: %s", step, e)
      if misfit is not None:
        if failures and quarantine:
          self._quarantine([s for s, _ in failures])
        raise IncompatibleCheckpointError(self._incompatible_message(step, misfit, config))
      try:
        found = self.restore(step, abstract_state), step
        break
      except Exception as e:  # Orbax and tensorstore raise many types for missing or bad files
        if _transient(e):  # the storage or this machine failed, not the checkpoint: move nothing
          raise CheckpointError(
            f"{self.directory}/{step}: could not be read ({_reason(e)}); this looks like a passing failure of the "
            "storage or of this machine, not of the checkpoint, so nothing was moved: rerun"
          ) from e
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.warning("checkpoint step %d in %s is unusable, trying the one before: %s", step, self.directory, reason)
        failures.append((step, reason))
    if failures and quarantine:
      self._quarantine([step for step, _ in failures])
    if found is None and failures:
      raise CheckpointError(
        f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {s}: {r}" for s, r in failures)
      )
    return found

  def _saved_leaves(self, step: int) -> dict:
    """{leaf name: metadata (shape, dtype)} of the arrays saved at `step`, read without the arrays."""
    return {leaf_name(p): leaf for p, leaf in jax.tree.leaves_with_path(self._manager.item_metadata(step).state)}

  def pick_step(self, step: int | None, path: str) -> int:
    """`step`, or the latest when None; FileNotFoundError naming `path` when it is not saved here."""
    steps = self.all_steps()
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"checkpoint {path}: no step {step} (steps: {steps})")
    return step

  def _misfit(self, step: int, abstract_state) -> str | None:
    """The first difference between the arrays saved at `step` and `abstract_state` (names, then
    shapes and dtypes), or None when the tree fits."""
    saved = self._saved_leaves(step)
    wanted = {leaf_name(p): leaf for p, leaf in jax.tree.leaves_with_path(abstract_state)}
    for name in sorted(set(wanted) - set(saved)):
      return f"array {name} {list(wanted[name].shape)} of this config is not in the checkpoint"
    for name in sorted(set(saved) - set(wanted)):
      return f"array {name} {list(saved[name].shape)} of the checkpoint is not in this config's state"
    for name, want in wanted.items():
      have = saved[name]
      if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
        return (
          f"array {name} is {list(have.shape)} {np.dtype(have.dtype).name} in the checkpoint but "
          f"{list(want.shape)} {np.dtype(want.dtype).name} in this config"
        )
    return None

  def _incompatible_message(self, step: int, misfit: str, config: dict | None) -> str:
    where = f"{self.directory}/{step}"
    differ = ""
    if config is not None:
      try:
        changes = config_differences(self.restore_config(step), config)
      except Exception as e:  # the config item is unreadable: say so, the arrays still decide
        changes = [f"(the checkpoint's config is unreadable: {type(e).__name__})"]
      shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
      differ = f"; config fields that differ from the checkpoint's: {shown or 'none'}"
    return (
      f"{where} does not fit this config: {misfit}{differ}. Nothing was moved: run with the checkpoint's "
      f"config (python -m tmlx.checkpoint inspect {self.directory} shows it), use another --workdir for the "
      "new config, or start from its parameters with config.init.params_from"
    )

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unusable steps aside (kept for a post-mortem) so that the run can save them again."""
    if jax.process_index() == 0:
      for step in steps:
        bad = paths.join(self.directory, str(step))
        aside = f"{bad}.unusable-{int(time.time())}"
        paths.move(bad, aside)  # on object storage a copy, then the deletion of the step
        logging.warning("moved unusable checkpoint step %d to %s", step, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("tmlx checkpoint quarantine")
    self._manager.reload()

  def restore_params(
    self, step: int, abstract_params, reinit: tuple[str, ...] = ()
  ) -> tuple[dict, list[str], list[str]]:
    """Reads the parameters of `step` that the current model shares with it.

    `abstract_params` carries the current shapes and target shardings. Returns {leaf name:
    array} of the restored leaves (each checked against its fingerprint), the names of leaves the
    checkpoint lacks or that `reinit` (name prefixes) asks to initialize fresh, and the names of
    checkpoint parameters the model does not have. A leaf whose shape differs is an error naming
    it, unless exactly one dimension grew (more experts): then the saved array is returned as it
    is, for the caller to place at the start of that dimension (`grown_axis`).
    """
    saved = self._saved_leaves(step)
    current = {leaf_name(("params",) + tuple(p)): leaf for p, leaf in jax.tree.leaves_with_path(abstract_params)}
    wanted, fresh = {}, []
    for name, leaf in current.items():
      short = name.removeprefix("params/")
      if name not in saved or any(short.startswith(r) for r in reinit):
        fresh.append(short)
        continue
      old_shape, new_shape = tuple(saved[name].shape), tuple(leaf.shape)
      axis = grown_axis(old_shape, new_shape)
      if old_shape != new_shape and axis is None:
        raise CheckpointError(
          f"{self.directory}/{step}: parameter {short} is {list(old_shape)} in the checkpoint but "
          f"{list(new_shape)} in this model; list it in config.init.reinit to initialize it fresh"
        )
      if old_shape != new_shape:
        fresh.append(f"{short} (axis {axis}: {old_shape[axis]}..{new_shape[axis] - 1})")
        sharding = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
      else:
        sharding = leaf.sharding
      wanted[name] = jax.ShapeDtypeStruct(old_shape, leaf.dtype, sharding=sharding)
    unused = sorted(n.removeprefix("params/") for n in saved if n.startswith("params/") and n not in current)
    tree: dict = {}
    for name, sds in wanted.items():
      node = tree
      *parents, last = name.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[last] = sds
    restored = self.restore_parts(step, tree)
    return {leaf_name(p): a for p, a in jax.tree.leaves_with_path(restored)}, fresh, unused

  def restore_parts(self, step: int, abstract: dict) -> dict:
    """Only the named parts of the state (e.g. {"params": ..., "model_state": ...}, the arrays a
    model needs for inference, without the optimizer), restored onto the shardings the abstract
    leaves carry and checked against their fingerprints."""
    _require_shardings(abstract)
    restored = ocp.PyTreeCheckpointer().restore(
      paths.join(self.directory, str(step), "state"),
      args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
      ),
    )
    saved = self.restore_meta(step).get("fingerprints", {})
    for name, fp in fingerprints(restored).items():
      if saved.get(name) != fp:
        raise CheckpointError(f"{self.directory}/{step}: array {name} does not match its fingerprint")
    return restored

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore())).meta

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed already (cheap: call it often)."""
    with self._save_errors():
      self._manager.check_for_errors()

  def wait(self) -> None:
    with self._save_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and closes; a failed save raises CheckpointSaveError here
    unless it was raised already."""
    try:
      if not self._failed:  # a failure already raised is not raised again
        with self._save_errors():
          self._manager.wait_until_finished()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # the failed save again: reported above
        logging.debug("closing the checkpoint manager: %s", e)


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """'model.num_layers: 2 → 3' for every field whose value differs between two resolved configs."""
  as_json = lambda tree: _flatten(json.loads(json.dumps(tree)))  # tuples and lists alike
  old, new = as_json(saved), as_json(current)
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
    if a != b:
      out.append(f"{key}: {a!r} → {b!r}")
  return out


def quarantined(directory: str) -> list[str]:
  """Names of the steps an earlier run moved aside as unusable (`<step>.unusable-<time>`)."""
  return [n for n in paths.listdir(directory) if ".unusable-" in n]


def grown_axis(old_shape: tuple, new_shape: tuple) -> int | None:
  """The one dimension in which `new_shape` is larger than `old_shape`, all others equal; else None."""
  if len(old_shape) != len(new_shape):
    return None
  differ = [i for i, (a, b) in enumerate(zip(old_shape, new_shape)) if a != b]
  if len(differ) == 1 and new_shape[differ[0]] > old_shape[differ[0]]:
    return differ[0]
  return None


def verify(state, meta: dict, where: str) -> None:
  """Raises CheckpointError if an array of `state` does not match its fingerprint in `meta`."""
  saved = meta.get("fingerprints")
  if not saved:
    raise CheckpointError(f"{where}: the metadata has no fingerprints")
  now = fingerprints(state)
  if set(now) != set(saved):
    missing = sorted(set(saved) ^ set(now))
    raise CheckpointError(f"{where}: arrays differ from the fingerprinted ones: {missing[:5]}")
  for path, fp in now.items():
    if fp != saved[path]:
      raise CheckpointError(f"{where}: array {path} does not match its fingerprint (saved {saved[path]}, read {fp})")


# -- inspection ------------------------------------------------------------------------------------


def inspect(path: str, step: int | None = None, check: bool = False, out=sys.stdout) -> None:
  """Prints the steps, the resolved config, the array tree (shape, dtype, size) and, with
  `check`, whether every array matches its fingerprint (restored onto this process's first device)."""
  ckpt = open_existing(path)
  steps = ckpt.all_steps()
  print(f"checkpoints in {ckpt.directory}: steps {steps}", file=out)
  step = ckpt.pick_step(step, path)
  meta = ckpt.restore_meta(step)
  config = ckpt.restore_config(step)
  print(
    f"step {step}: tmlx {meta.get('tmlx_version')}, mesh {meta.get('mesh')}, "
    f"{meta.get('process_count')} process(es), data position {meta.get('data')}",
    file=out,
  )
  print("resolved config:", file=out)
  print(json.dumps(config, indent=1, sort_keys=True), file=out)
  tree = ckpt._manager.item_metadata(step).state
  total = 0
  print("arrays (path, shape, dtype, size, saved sharding):", file=out)
  for p, leaf in jax.tree.leaves_with_path(tree):
    shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    total += size
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", None) if sharding is not None else None
    print(f"  {leaf_name(p):60s} {str(shape):20s} {dtype.name:9s} {size / 2**20:10.3f} MiB  {spec}", file=out)
  print(f"total {total / 2**30:.4f} GiB in {len(jax.tree.leaves(tree))} arrays", file=out)
  if check:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device), tree)
    try:
      ckpt.restore(step, abstract)
      print(f"fingerprints: all {len(meta['fingerprints'])} arrays match", file=out)
    except CheckpointError as e:
      print(f"fingerprints: MISMATCH: {e}", file=out)
      raise SystemExit(1) from None
    except Exception as e:  # unreadable files: Orbax and tensorstore raise many types
      print(f"arrays: UNREADABLE: {type(e).__name__}: {e}", file=out)
      raise SystemExit(1) from None
  ckpt.close()


def main(argv=None) -> None:
  import argparse

  parser = argparse.ArgumentParser(prog="python -m tmlx.checkpoint", description="Inspect tmlx checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("inspect", help="steps, config, arrays and fingerprint check of a checkpoint directory")
  p.add_argument("path", help="a checkpoint directory (<workdir>/checkpoints) or a workdir")
  p.add_argument("--step", type=int, default=None, help="step to inspect (default: the latest)")
  p.add_argument("--verify", action="store_true", help="restore every array and check its fingerprint")
  args = parser.parse_args(argv)
  try:
    inspect(args.path, args.step, args.verify)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None


if __name__ == "__main__":
  main()
