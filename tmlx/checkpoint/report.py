"""What a checkpoint directory holds, printed: steps, resolved config, arrays with their saved
shardings, and (optionally) a fingerprint check."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from tmlx.checkpoint.fingerprint import leaf_name
from tmlx.checkpoint.manager import CheckpointError, open_existing


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
    row = f"{leaf_name(p):60s} {str(shape):20s} {dtype.name:9s} {size / 2**20:10.3f} MiB"
    print(f"  {row}  {_saved_spec(leaf)}", file=out)
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


def _saved_spec(leaf) -> str:
  """The PartitionSpec an array was saved with, from Orbax's metadata (NamedShardingMetadata keeps
  it as `partition_spec`), or what the metadata says instead."""
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return "no sharding saved"
  spec = getattr(sharding, "partition_spec", None)
  if spec is not None:
    return str(jax.sharding.PartitionSpec(*spec))
  return type(sharding).__name__
