"""Test setup: 8 fake CPU devices, created before any test touches JAX, and one persistent
compilation cache for the whole session.

The cache is shared through the environment, so that the `python -m tmlx.main` processes the tests
start (and the tests' own jitted programs) load a program another test already compiled instead of
compiling it again: most of the tests' runs are the same tiny config. A test that is about the cache
itself points JAX_COMPILATION_CACHE_DIR elsewhere or removes it (tests/test_goodput.py). Set the
variable yourself to keep the cache between sessions."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tmlx-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
