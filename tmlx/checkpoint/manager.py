"""The Checkpointer: saves, restores (falling back past unusable steps, moving them aside) and
reads back configs, metadata and parameters; the errors it raises."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

import tmlx
from tmlx import fields, paths
from tmlx.checkpoint import handlers
from tmlx.checkpoint.fingerprint import fingerprints, fingerprints_async, leaf_name


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


class NoCheckpointError(FileNotFoundError):
  """A path given to read checkpoints from is not there, or holds none."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the config's state: the config is wrong (or the
  workdir is another run's), not the checkpoint, so nothing is moved aside."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """`config.checkpoint` (experiments/base.py says what each field does)."""

  every: int
  keep: int
  keep_every: int
  async_save: bool

  def __post_init__(self):
    fields.positive(self, "keep")  # 0 would keep nothing, and the next run would start from scratch
    fields.in_range(self, "every", 0)
    fields.in_range(self, "keep_every", 0)


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
        "state": ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=handlers.type_handlers()),
        "config": ocp.JsonCheckpointHandler(),
        "meta": handlers.MetaHandler(handlers.META_FILE),
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
          state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config), meta=handlers.MetaSave(meta)
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
      self._failed = f"saving checkpoint step {self._saving} in {self.directory} failed: {handlers.reason(e)}"
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
        meta=handlers.MetaRestore(),
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
        if handlers.transient(e):  # the storage or this machine failed, not the checkpoint: move nothing
          raise CheckpointError(
            f"{self.directory}/{step}: could not be read ({handlers.reason(e)}); this looks like a passing failure "
            "of the storage or of this machine, not of the checkpoint, so nothing was moved: rerun"
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
    restored = self.restore_parts(step, traverse_util.unflatten_dict(wanted, sep="/"))
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
    return self._manager.restore(step, args=ocp.args.Composite(meta=handlers.MetaRestore())).meta

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


def config_differences(saved: dict, current: dict) -> list[str]:
  """'model.num_layers: 2 → 3' for every field whose value differs between two resolved configs."""
  as_json = lambda tree: traverse_util.flatten_dict(json.loads(json.dumps(tree)), sep=".")  # tuples and lists alike
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
