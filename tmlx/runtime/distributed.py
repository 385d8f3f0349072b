"""JAX's multi-controller runtime: `jax.distributed.initialize` with the settings that
`tmlx.runtime.cluster` finds, called before JAX creates a backend."""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import logging

from tmlx.runtime.cluster import EXPLICIT_VARS, DistributedEnvError, Overrides, Settings, physical_devices, resolve


def initialize(settings: Settings) -> None:
  """`jax.distributed.initialize` with `settings`; call before any JAX computation."""
  import jax

  # gloo is jax 0.10's default for CPU collectives; without a cross-process implementation
  # (the option set to None) every multi-process CPU collective would fail.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Preemption (SIGTERM) is tmlx.faults.Preemption's: JAX's preemption service would take SIGTERM
  # over at initialize, and its sync point can miss a notice (see that class).
  jax.config.update("jax_enable_preemption_service", False)
  if settings.auto:
    _initialize_auto(jax, settings)
    return
  loopback = settings.loopback_host
  jax.distributed.initialize(
    coordinator_address=settings.coordinator_address,
    num_processes=settings.num_processes,
    process_id=settings.process_id,
    local_device_ids=settings.local_device_ids,
    cluster_detection_method="deactivate",  # the settings are complete: no cluster auto-detection
    initialization_timeout=settings.init_timeout_s,
    heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
    # A job on one machine listens on loopback only (JAX's default binds every interface).
    coordinator_bind_address=settings.coordinator_address if loopback else None,
  )
  if loopback and jax.config.jax_cpu_collectives_implementation == "gloo":
    _bind_gloo_to(loopback)
  devices = "all visible"
  if settings.local_device_ids is not None:
    physical = ", ".join(physical_devices(settings.local_device_ids, os.environ))
    devices = f"{list(settings.local_device_ids)} of the visible ones (physical {physical})"
  logging.info(
    "distributed: process %d of %d, coordinator %s (%s), local devices %s",
    settings.process_id,
    settings.num_processes,
    settings.coordinator_address,
    settings.source,
    devices,
  )


def _initialize_auto(jax, settings: Settings) -> None:
  """Lets JAX's own cluster detection fill in what `settings` leaves None (TPU metadata, multislice)."""
  try:
    jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      local_device_ids=settings.local_device_ids,
      initialization_timeout=settings.init_timeout_s,
      heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
    )
  except ValueError as e:  # JAX found no cluster: it has no coordinator, count or id
    raise DistributedEnvError(
      f"{settings.source}: JAX's cluster detection failed ({e}); set {', '.join(EXPLICIT_VARS)}"
    ) from e
  try:  # what JAX detected; only its private state records it without starting a backend
    from jax._src.distributed import global_state

    joined = (global_state.process_id, global_state.num_processes, global_state.coordinator_address)
  except (ImportError, AttributeError):
    joined = ("?", "?", "?")
  logging.info("distributed: process %s of %s, coordinator %s (%s)", *joined, settings.source)


def _bind_gloo_to(host: str) -> None:
  """Makes the CPU backend's gloo collectives listen on `host`.

  By default gloo listens on the address the machine's hostname resolves to, which need not be
  loopback. JAX exposes no option for this, so the CPU backend factory is replaced (private API of
  the pinned jax; if it changed, gloo keeps its default address and a warning says so).
  """
  try:
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    def make_cpu_client():
      client = jax_distributed.global_state.client
      return xla_bridge.make_cpu_client(collectives=_jax.make_gloo_tcp_collectives(client, hostname=host))

    xla_bridge.register_backend_factory("cpu", make_cpu_client, priority=0, fail_quietly=False)
  except (ImportError, AttributeError, TypeError, RuntimeError) as e:
    logging.warning("distributed: could not bind gloo collectives to %s (%s); using gloo's default address", host, e)


def initialize_from_env(env: Mapping[str, str] | None = None, overrides: Overrides | None = None) -> Settings | None:
  """Initializes JAX's distributed runtime if the flags or the environment describe a multi-process job.

  Returns the settings used, or None for a single process (nothing done). Raises
  DistributedEnvError, naming the variable or flag, for an incomplete or invalid description.
  """
  settings = resolve(env, overrides)
  if settings is None:
    return None
  initialize(settings)
  return settings
