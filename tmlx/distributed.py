"""Multi-process start-up: find this process's place in the job from the environment and call
`jax.distributed.initialize` before JAX creates a backend.

Sources are tried in order (`DETECTORS`); the first that recognises its environment wins:
  explicit  TMLX_COORDINATOR_ADDRESS (host:port), TMLX_NUM_PROCESSES, TMLX_PROCESS_ID, and optionally
            TMLX_INIT_TIMEOUT_S (default 300) and TMLX_HEARTBEAT_TIMEOUT_S (default 30).
With none of them set the job is a single process and nothing is initialized.

Fake CPU devices: `config.runtime.cpu_devices` is the number of devices of *each* process; a launcher
of N local processes for an 8-device mesh passes `--config.runtime.cpu_devices=8/N` (tmlx.local_cluster
does). On CPU the cross-process collectives are gloo over TCP. With a loopback coordinator (a job on
one machine) the coordinator and gloo listen on loopback only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Mapping

from absl import logging

ENV_COORDINATOR = "TMLX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "TMLX_NUM_PROCESSES"
ENV_PROCESS_ID = "TMLX_PROCESS_ID"
ENV_INIT_TIMEOUT = "TMLX_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "TMLX_HEARTBEAT_TIMEOUT_S"
EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class DistributedEnvError(ValueError):
  """The environment describes a multi-process job incompletely or with invalid values."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Where this process sits in a multi-process job."""

  coordinator_address: str  # host:port of process 0's coordination service
  num_processes: int
  process_id: int
  init_timeout_s: int = 300  # how long to wait for every process to connect
  heartbeat_timeout_s: int = 30  # a process silent for this long is dead, and the job aborts
  source: str = "explicit"  # the detector that produced these settings

  @property
  def loopback_host(self) -> str | None:
    """The coordinator's host if it is a loopback address (a job on one machine), else None."""
    host = self.coordinator_address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
      return "127.0.0.1"
    try:
      return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
      return None


def _int_var(env: Mapping[str, str], name: str, *, minimum: int, default: int | None = None) -> int:
  raw = env.get(name)
  if raw is None or raw == "":
    if default is None:
      raise DistributedEnvError(f"{name} is not set")
    return default
  try:
    value = int(raw)
  except ValueError:
    raise DistributedEnvError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise DistributedEnvError(f"{name}={value} must be at least {minimum}")
  return value


def _coordinator_var(env: Mapping[str, str]) -> str:
  address = env[ENV_COORDINATOR]
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedEnvError(f"{ENV_COORDINATOR}={address!r} is not host:port (e.g. 127.0.0.1:12345)")
  return address


def explicit(env: Mapping[str, str]) -> Settings | None:
  """Settings from the TMLX_* variables; None when none of the three required ones is set."""
  present = [v for v in EXPLICIT_VARS if env.get(v)]
  if not present:
    return None
  missing = [v for v in EXPLICIT_VARS if not env.get(v)]
  if missing:
    raise DistributedEnvError(
      f"multi-process job half-configured: {', '.join(present)} set but {', '.join(missing)} missing; "
      f"set all of {', '.join(EXPLICIT_VARS)} (or none, for a single process)"
    )
  num = _int_var(env, ENV_NUM_PROCESSES, minimum=1)
  pid = _int_var(env, ENV_PROCESS_ID, minimum=0)
  if pid >= num:
    raise DistributedEnvError(f"{ENV_PROCESS_ID}={pid} must be below {ENV_NUM_PROCESSES}={num}")
  return Settings(
    coordinator_address=_coordinator_var(env),
    num_processes=num,
    process_id=pid,
    init_timeout_s=_int_var(env, ENV_INIT_TIMEOUT, minimum=1, default=300),
    heartbeat_timeout_s=_int_var(env, ENV_HEARTBEAT_TIMEOUT, minimum=1, default=30),
    source="explicit",
  )


# Tried in order; each returns Settings, None (not its environment) or raises DistributedEnvError.
DETECTORS: tuple[Callable[[Mapping[str, str]], Settings | None], ...] = (explicit,)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings | None:
  """The first detector's settings for `env` (default os.environ); None for a single process."""
  env = os.environ if env is None else env
  for detect in DETECTORS:
    settings = detect(env)
    if settings is not None:
      return settings
  return None


def initialize(settings: Settings) -> None:
  """`jax.distributed.initialize` with `settings`; call before any JAX computation."""
  import jax

  # gloo is jax 0.10's default for CPU collectives; without a cross-process implementation
  # (the option set to None) every multi-process CPU collective would fail.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Preemption (SIGTERM) is tmlx.train.Preemption's: JAX's preemption service would take SIGTERM
  # over at initialize, and its sync point can miss a notice (see that class).
  jax.config.update("jax_enable_preemption_service", False)
  loopback = settings.loopback_host
  jax.distributed.initialize(
    coordinator_address=settings.coordinator_address,
    num_processes=settings.num_processes,
    process_id=settings.process_id,
    cluster_detection_method="deactivate",  # the settings are complete: no cluster auto-detection
    initialization_timeout=settings.init_timeout_s,
    heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
    # A job on one machine listens on loopback only (JAX's default binds every interface).
    coordinator_bind_address=settings.coordinator_address if loopback else None,
  )
  if loopback and jax.config.jax_cpu_collectives_implementation == "gloo":
    _bind_gloo_to(loopback)
  logging.info(
    "distributed: process %d of %d, coordinator %s (%s)",
    settings.process_id,
    settings.num_processes,
    settings.coordinator_address,
    settings.source,
  )


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


def initialize_from_env(env: Mapping[str, str] | None = None) -> Settings | None:
  """Initializes JAX's distributed runtime if the environment describes a multi-process job.

  Returns the settings used, or None for a single process (nothing done). Raises
  DistributedEnvError, naming the variable, for an incomplete or invalid description.
  """
  settings = settings_from_env(env)
  if settings is None:
    return None
  initialize(settings)
  return settings
