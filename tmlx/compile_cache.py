"""The persistent compilation cache: compiled programs are written to a directory, and a later
process that compiles the same program (a resumed run, a rerun of the same config) loads it instead.

On by default (`config.runtime.compile_cache`), in `config.runtime.compile_cache_dir`, else in
JAX_COMPILATION_CACHE_DIR if the environment sets one (a cache shared by many runs), else in
`<workdir>/compile_cache`. Programs that compiled in under a second are not stored (JAX's default,
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS): the train step and the state's initialization are,
while the hundreds of small programs of eager operations, which would cost more to store and look
up than to compile (each one an object on object storage), are not. Only process 0 writes entries
(JAX's own rule); every process reads them. The cache holds executables that a process runs as
they are: keep it where only the job's owner can write, as with checkpoints.

`hits()` counts the cache hits of this process (JAX's monitoring events), so that the trainer can
tell whether its train step was loaded or compiled.
"""

from __future__ import annotations

import os

from tmlx import paths

_counts = {"requests": 0, "hits": 0}
_listening = False


def directory(cfg, workdir: str, env=None) -> str | None:
  """The cache directory for `cfg` (config.runtime) and `workdir`; None when the cache is off."""
  env = os.environ if env is None else env
  if not cfg.compile_cache:
    return None
  return cfg.compile_cache_dir or env.get("JAX_COMPILATION_CACHE_DIR") or paths.join(workdir, "compile_cache")


def _on_event(event: str, **_) -> None:
  if event == "/jax/compilation_cache/compile_requests_use_cache":
    _counts["requests"] += 1
  elif event == "/jax/compilation_cache/cache_hits":
    _counts["hits"] += 1


def hits() -> tuple[int, int]:
  """(compilations that looked in the cache, hits) so far in this process."""
  return _counts["requests"], _counts["hits"]


def enable(path: str | None):
  """Points JAX at the cache in `path` (None: off) from the next compilation on; returns a function
  that puts the previous setting back (for `tmlx.train.run` called from Python: the cache of one
  run does not outlive it)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening = True
  previous = jax.config.jax_compilation_cache_dir

  def apply(cache_dir) -> None:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    cc.reset_cache()  # a cache JAX already opened elsewhere is dropped; the next compile opens this one

  if path is not None:
    paths.makedirs(path)
  apply(path)
  return lambda: apply(previous)
