"""Shared test helpers: tiny configs, synthetic batches, and the commands run in subprocesses."""

import importlib
import os
import pathlib
import resource
import subprocess
import sys

import jax.numpy as jnp

import data_pipelines
from tmlx.nn.model import ModelConfig
from tmlx.state import new_model


def tiny_config(arg=None):
  return importlib.import_module("experiments.sample_cpu").get_config(arg)


def tiny_model_config(**overrides) -> ModelConfig:
  c = tiny_config("tiny")
  c.model.compute_dtype = "float32"
  for k, v in overrides.items():
    node = c.model
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return ModelConfig.from_config(c.model)


def synthetic_batch(config, step: int = 0, rows: int | None = None) -> dict:
  """A host batch of `rows` rows from the synthetic source with `config`'s geometry, as jnp arrays."""
  config = config.copy_and_resolve_references()
  config.data.source = "synthetic"
  return {k: jnp.asarray(v) for k, v in data_pipelines.stacked_rows(config, step, rows).items()}


def tiny_model(seed: int = 0, **overrides):
  return new_model(tiny_model_config(**overrides), seed)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(config: str, workdir, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `python -m tmlx.main` in a fresh process (its own fake devices), capturing its log."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "tmlx.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_build(
  *args: str, memory_limit: int | None = None, file_size_limit: int | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
  """Runs `python -m data_pipelines.build ARGS` in a subprocess, optionally under an address-space
  or file-size limit in bytes."""
  limits = [(resource.RLIMIT_AS, memory_limit), (resource.RLIMIT_FSIZE, file_size_limit)]
  limits = [(kind, n) for kind, n in limits if n is not None]
  return subprocess.run(
    [sys.executable, "-m", "data_pipelines.build", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    preexec_fn=(lambda: [resource.setrlimit(kind, (n, n)) for kind, n in limits]) if limits else None,
  )
