"""How Orbax writes the items of a step (the state's type handlers, the `meta` item whose
fingerprints are awaited in the background commit), and how its failures read in one line."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging as std_logging
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # the store Orbax's default handler has

# Orbax's handlers for the state's leaves, but with replica-parallel saving (each replica of a
# replicated shard writes a slice of it) only where a slice is at least this big. Cutting a slice
# is a device program compiled per array shape: for the norm scales, biases and small tables it
# costs more than it saves, and the first save of a process compiled one for each of them (about
# 12 s for the tiny config on CPU; on a pod, a compile per distinct small shape on every host).
REPLICA_PARALLEL_MIN_SLICE_BYTES = 16 << 20


def type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
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


class MetaHandler(ocp.JsonCheckpointHandler):
  """The `meta` item: JSON whose values may be futures (the fingerprints), awaited in Orbax's
  background commit, so that a save blocks the train loop only for what must happen in order."""

  async def async_save(self, directory, item=None, args=None):
    meta = dict(args.item)

    async def write():
      for key, value in meta.items():
        if isinstance(value, concurrent.futures.Future):
          meta[key] = await asyncio.wrap_future(value)
      if jax.process_index() == 0:
        (directory / META_FILE).write_text(json.dumps(meta))

    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="tmlx_meta_save")]


META_FILE = "metadata"  # the file name JsonCheckpointHandler reads back


@ocp.args.register_with_handler(MetaHandler, for_save=True)
@dataclasses.dataclass
class MetaSave(ocp.args.CheckpointArgs):
  item: dict


@ocp.args.register_with_handler(MetaHandler, for_restore=True)
@dataclasses.dataclass
class MetaRestore(ocp.args.CheckpointArgs):
  pass


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


def reason(e: BaseException) -> str:
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


def transient(e: BaseException) -> bool:
  """Whether a failed read says more about the storage or the machine than about the checkpoint
  (out of memory or file handles, a store that did not answer): such a step is not quarantined."""
  if isinstance(e, (MemoryError, TimeoutError, ConnectionError)):
    return True
  text = str(e)
  return any(marker in text for marker in _TRANSIENT)
