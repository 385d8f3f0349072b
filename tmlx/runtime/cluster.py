"""Where this process sits in a multi-process job, found from tmlx.main's flags or the environment
(no JAX here: `tmlx.runtime.distributed` initializes JAX's runtime with what this finds).

The same `python -m tmlx.main` runs on every process. tmlx.main's flags --coordinator_address,
--num_processes, --process_id (all three, or none) override every environment, and --local_device_ids
replaces the detected devices (`resolve`). Otherwise the first source in `DETECTORS` that recognises
its environment says where the process sits in the job:

  explicit   TMLX_COORDINATOR_ADDRESS (host:port), TMLX_NUM_PROCESSES, TMLX_PROCESS_ID (all three).
  slurm      a task started by srun: SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, the node
             list SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST, SLURM_NODELIST), the layout
             SLURM_STEP_TASKS_PER_NODE (else SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE; "4(x2),2"),
             SLURM_GPUS_PER_TASK and CUDA_VISIBLE_DEVICES. Coordinator: the first node, port
             20000 + SLURM_JOB_ID % 12000 (see `slurm_port`). One task: a single process. One task
             per node uses all the node's GPUs; several per node use one each: all visible ones if
             SLURM cut CUDA_VISIBLE_DEVICES per task, else visible index SLURM_LOCALID.
  tpu        a multi-host TPU slice: TPU_WORKER_HOSTNAMES (comma list) and TPU_WORKER_ID; coordinator
             the first host, port 8482 (JAX's own TPU default). One host: a single process. With
             only other TPU markers (TPU_ACCELERATOR_TYPE, TPU_HOST_BOUNDS, TPU_PROCESS_ADDRESSES,
             MEGASCALE_*: multislice), JAX's own Cloud TPU detection runs (GCE metadata server).
  kubernetes an Indexed Job (JOB_COMPLETION_INDEX) or a JobSet (also JOBSET_NAME, REPLICATED_JOB_NAME,
             JOB_INDEX); Kubernetes does not expose the pod count, so TMLX_NUM_PROCESSES is required
             (and TMLX_PROCESSES_PER_JOB with several replicated-job replicas). Coordinator: pod 0 of
             job 0 of a JobSet, port 55527 (JAX's Kubernetes default); a plain Indexed Job needs
             TMLX_COORDINATOR_ADDRESS.
With none of them the job is a single process and nothing is initialized.

Overrides valid for every source: TMLX_COORDINATOR_ADDRESS replaces a derived coordinator,
TMLX_COORDINATOR_PORT only its port; TMLX_INIT_TIMEOUT_S (default 300) and TMLX_HEARTBEAT_TIMEOUT_S
(default 30) set the timeouts. Every detector is a pure function of an environment mapping.

Fake CPU devices: `config.runtime.cpu_devices` is the number of devices of *each* process; a launcher
of N local processes for an 8-device mesh passes `--config.runtime.cpu_devices=8/N` (tmlx.runtime.local_cluster
does). On CPU the cross-process collectives are gloo over TCP. With a loopback coordinator (a job on
one machine) the coordinator and gloo listen on loopback only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import hostlist

ENV_COORDINATOR = "TMLX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "TMLX_NUM_PROCESSES"
ENV_PROCESS_ID = "TMLX_PROCESS_ID"
ENV_INIT_TIMEOUT = "TMLX_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "TMLX_HEARTBEAT_TIMEOUT_S"
ENV_COORDINATOR_PORT = "TMLX_COORDINATOR_PORT"
ENV_PROCESSES_PER_JOB = "TMLX_PROCESSES_PER_JOB"
EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)

SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
  "SLURM_STEP_NODELIST",
  "SLURM_JOB_NODELIST",
  "SLURM_NODELIST",
  "SLURM_STEP_TASKS_PER_NODE",
  "SLURM_NTASKS_PER_NODE",
  "SLURM_TASKS_PER_NODE",
  "SLURM_GPUS_PER_TASK",
)
_TPU_HOSTS, _TPU_WORKER_ID, _TPU_SKIP_MDS = "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_SKIP_MDS_QUERY"
# Variables that only multi-host TPU set-ups have; JAX's detection reads the MEGASCALE_* ones.
TPU_MARKERS = (
  _TPU_HOSTS,
  _TPU_WORKER_ID,
  "TPU_PROCESS_ADDRESSES",
  "TPU_ACCELERATOR_TYPE",
  "TPU_HOST_BOUNDS",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "MEGASCALE_NUM_SLICES",
  "MEGASCALE_SLICE_ID",
)
K8S_VARS = ("JOB_COMPLETION_INDEX", "JOBSET_NAME", "REPLICATED_JOB_NAME", "JOB_INDEX")
# Everything the detectors read that decides job membership (tmlx.runtime.local_cluster drops these from the
# environment its children inherit). CUDA_VISIBLE_DEVICES is device visibility, not membership: kept.
DETECTED_VARS = (
  *EXPLICIT_VARS,
  ENV_INIT_TIMEOUT,
  ENV_HEARTBEAT_TIMEOUT,
  ENV_COORDINATOR_PORT,
  ENV_PROCESSES_PER_JOB,
  *SLURM_VARS,
  *TPU_MARKERS,
  _TPU_SKIP_MDS,
  *K8S_VARS,
)

# Below Linux's default ephemeral range (32768-60999), so no outgoing connection holds the port; the
# job id spreads concurrent jobs that share a first node over 12000 ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000
# jax 0.10's Cloud TPU detection uses 8482 (8476 is libtpu's mesh controller), and its Kubernetes one 55527.
TPU_PORT = 8482
K8S_PORT = 55527


def expand_hostlist(expr: str) -> list[str]:
  """The host names of a SLURM host list, in order, repeats kept ("node[001-003,007]" → node001
  node002 node003 node007: zero padding kept; several bracket groups expand as a product).
  Whitespace is ignored. ValueError if malformed."""
  compact = re.sub(r"\s+", "", expr)
  try:
    hosts = hostlist.expand_hostlist(compact, allow_duplicates=True)
  except hostlist.BadHostlist as e:
    raise ValueError(f"malformed hostlist {expr!r}: {e}") from None
  if not hosts or re.search(r"(^|,)(,|$)", compact):  # the library skips empty names
    raise ValueError(f"malformed hostlist {expr!r}: empty host name")
  return hosts


def expand_counts(expr: str) -> list[int]:
  """Per-node task counts of SLURM's compressed form: "4(x2),2" → [4, 4, 2]. ValueError if malformed."""
  try:
    return hostlist.parse_slurm_tasks_per_node(re.sub(r"\s+", "", expr))
  except hostlist.BadHostlist as e:
    raise ValueError(f"bad task counts {expr!r} (expected N or N(xR), comma separated): {e}") from None


class DistributedEnvError(ValueError):
  """The environment describes a multi-process job incompletely or with invalid values."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Where this process sits in a multi-process job.

  With `auto`, JAX's own cluster detection fills in what is None (the coordinator, the process count
  and id); otherwise all three are set and JAX's detection is off.
  """

  coordinator_address: str | None  # host:port of process 0's coordination service
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None  # indices among the visible devices; None: all of them
  init_timeout_s: int = 300  # how long to wait for every process to connect
  heartbeat_timeout_s: int = 30  # a process silent for this long is dead, and the job aborts
  source: str = "explicit"  # the detector that produced these settings
  auto: bool = False

  @property
  def loopback_host(self) -> str | None:
    """The coordinator's host if it is a loopback address (a job on one machine), else None."""
    if self.coordinator_address is None:
      return None
    host = self.coordinator_address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
      return "127.0.0.1"
    try:
      return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
      return None


@dataclasses.dataclass(frozen=True)
class Overrides:
  """tmlx.main's --coordinator_address, --num_processes, --process_id and --local_device_ids flags."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: Sequence[int | str] | None = None


def _int(raw: str, name: str, *, minimum: int) -> int:
  try:
    value = int(raw)
  except (TypeError, ValueError):
    raise DistributedEnvError(f"{name}={raw!r} is not an integer") from None
  if value < minimum:
    raise DistributedEnvError(f"{name}={value} must be at least {minimum}")
  return value


def _int_var(env: Mapping[str, str], name: str, *, minimum: int, default: int | None = None) -> int:
  raw = env.get(name)
  if raw is None or raw == "":
    if default is None:
      raise DistributedEnvError(f"{name} is not set")
    return default
  return _int(raw, name, minimum=minimum)


def _check_address(address: str, name: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedEnvError(f"{name}={address!r} is not host:port (e.g. 127.0.0.1:12345)")
  return address


def _coordinator(env: Mapping[str, str], host: str, default_port: int) -> str:
  """TMLX_COORDINATOR_ADDRESS if set, else `host` with TMLX_COORDINATOR_PORT or `default_port`."""
  if env.get(ENV_COORDINATOR):
    return _check_address(env[ENV_COORDINATOR], ENV_COORDINATOR)
  port = _int_var(env, ENV_COORDINATOR_PORT, minimum=1, default=default_port)
  if port > 65535:
    raise DistributedEnvError(f"{ENV_COORDINATOR_PORT}={port} must be at most 65535")
  return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timeouts(env: Mapping[str, str]) -> dict[str, int]:
  return {
    "init_timeout_s": _int_var(env, ENV_INIT_TIMEOUT, minimum=1, default=300),
    "heartbeat_timeout_s": _int_var(env, ENV_HEARTBEAT_TIMEOUT, minimum=1, default=30),
  }


def _check_id(pid: int, num: int, id_names: str, num_names: str) -> None:
  if pid >= num:
    raise DistributedEnvError(f"process id {pid} (from {id_names}) must be below {num} (from {num_names})")


def _in_cluster(env: Mapping[str, str]) -> bool:
  """Whether a cluster source below may complete partial TMLX_* variables."""
  slurm_task = bool(env.get("SLURM_JOB_ID") and env.get("SLURM_PROCID"))
  return slurm_task or any(env.get(v) for v in TPU_MARKERS) or bool(env.get("JOB_COMPLETION_INDEX"))


def explicit(env: Mapping[str, str]) -> Settings | None:
  """Settings from the TMLX_* variables; None when not all three required ones are set.

  Partial sets are errors, except where a cluster source completes them: TMLX_COORDINATOR_ADDRESS
  alone overrides any detected coordinator, and Kubernetes reads TMLX_NUM_PROCESSES (it has no count).
  """
  present = [v for v in EXPLICIT_VARS if env.get(v)]
  if not present:
    return None
  missing = [v for v in EXPLICIT_VARS if not env.get(v)]
  if missing:
    kubernetes_input = env.get("JOB_COMPLETION_INDEX") and ENV_PROCESS_ID in missing
    if kubernetes_input or (present == [ENV_COORDINATOR] and _in_cluster(env)):
      return None
    raise DistributedEnvError(
      f"multi-process job half-configured: {', '.join(present)} set but {', '.join(missing)} missing; "
      f"set all of {', '.join(EXPLICIT_VARS)} (or none, for a single process)"
    )
  num = _int_var(env, ENV_NUM_PROCESSES, minimum=1)
  pid = _int_var(env, ENV_PROCESS_ID, minimum=0)
  if pid >= num:
    raise DistributedEnvError(f"{ENV_PROCESS_ID}={pid} must be below {ENV_NUM_PROCESSES}={num}")
  address = _check_address(env[ENV_COORDINATOR], ENV_COORDINATOR)
  return Settings(address, num, pid, source="explicit", **_timeouts(env))


def slurm_port(job_id: int) -> int:
  """The default coordinator port of SLURM job `job_id`: 20000 + job_id % 12000 (20000-31999)."""
  return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
  """The entries of CUDA_VISIBLE_DEVICES (GPU numbers or UUIDs); None when it is unset (all GPUs)."""
  raw = env.get("CUDA_VISIBLE_DEVICES")
  if raw is None:
    return None
  return [d.strip() for d in raw.split(",") if d.strip()]


def physical_devices(local_device_ids: Sequence[int] | None, env: Mapping[str, str]) -> list[str] | None:
  """The CUDA_VISIBLE_DEVICES entries that `local_device_ids` (indices among visible devices) select.

  With CUDA_VISIBLE_DEVICES="4,5,6,7", index 2 is physical GPU "6". None: every visible device.
  """
  if local_device_ids is None:
    return None
  visible = visible_gpus(env)
  return [visible[i] if visible is not None and i < len(visible) else str(i) for i in local_device_ids]


def _slurm_several_per_node(env: Mapping[str, str], num: int, num_nodes: int) -> bool:
  """Whether the job's layout runs several tasks on a node (one per GPU) rather than one per node.

  Decided for the whole layout, not this node, so every process picks the same scheme.
  """
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(name):
      try:
        return max(expand_counts(env[name])) > 1
      except ValueError as e:
        raise DistributedEnvError(f"{name}: {e}") from None
  return num > num_nodes or _int_var(env, "SLURM_LOCALID", minimum=0, default=0) > 0


def _slurm_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
  """The GPUs (indices among visible devices) of a task in a several-tasks-per-node layout.

  A task whose CUDA_VISIBLE_DEVICES SLURM already cut to its own GPUs (--gpus-per-task, --gpu-bind)
  uses every visible device; a task that sees the node's GPUs takes its share by SLURM_LOCALID.
  """
  local_id = _int_var(env, "SLURM_LOCALID", minimum=0)
  raw_per_task = env.get("SLURM_GPUS_PER_TASK", "")
  per_task = _int(raw_per_task.rsplit(":", 1)[-1], "SLURM_GPUS_PER_TASK", minimum=1) if raw_per_task else 1
  visible = visible_gpus(env)
  if visible is not None and len(visible) <= per_task:
    return None
  ids = tuple(range(local_id * per_task, (local_id + 1) * per_task))
  if visible is not None and ids[-1] >= len(visible):
    raise DistributedEnvError(
      f"SLURM_LOCALID={local_id} (x {per_task} GPUs per task) needs visible GPU index {ids[-1]}, but "
      f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} lists {len(visible)}; request one GPU per task"
    )
  return ids


def slurm(env: Mapping[str, str]) -> Settings | None:
  """Settings of a task started by srun; None outside one (no SLURM_JOB_ID or SLURM_PROCID) or for one task.

  One task per node uses every GPU of its node; several tasks per node use one GPU each (see
  `_slurm_local_device_ids`). Start every process with srun: a batch script itself is no task.
  """
  if not env.get("SLURM_JOB_ID") or not env.get("SLURM_PROCID"):
    return None
  num = _int_var(env, "SLURM_NTASKS", minimum=1)
  if num == 1:
    return None
  pid = _int_var(env, "SLURM_PROCID", minimum=0)
  _check_id(pid, num, "SLURM_PROCID", "SLURM_NTASKS")
  job_id = _int_var(env, "SLURM_JOB_ID", minimum=0)
  node_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
  if node_var is None:
    raise DistributedEnvError("SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) is not set: no coordinator host")
  try:
    nodes = expand_hostlist(env[node_var])
  except ValueError as e:
    raise DistributedEnvError(f"{node_var}: {e}") from None
  several = _slurm_several_per_node(env, num, len(nodes))
  return Settings(
    _coordinator(env, nodes[0], slurm_port(job_id)),
    num,
    pid,
    local_device_ids=_slurm_local_device_ids(env) if several else None,
    source="slurm",
    **_timeouts(env),
  )


def tpu(env: Mapping[str, str]) -> Settings | None:
  """Settings of a host of a multi-host TPU slice; None without TPU markers or on a single host.

  TPU_WORKER_HOSTNAMES (GKE and most launchers) gives the hosts, TPU_WORKER_ID this host's index.
  Without it, JAX's Cloud TPU detection (`auto`) reads the GCE metadata server, unless
  TPU_SKIP_MDS_QUERY forbids that; it also handles multislice (MEGASCALE_*) and TPU_PROCESS_ADDRESSES
  (several processes per host), which this detector leaves to it.
  """
  if not any(env.get(v) for v in TPU_MARKERS):
    return None
  auto = Settings(
    env.get(ENV_COORDINATOR) or None, None, None, source="tpu (JAX metadata detection)", auto=True, **_timeouts(env)
  )
  if env.get(ENV_COORDINATOR):
    _check_address(env[ENV_COORDINATOR], ENV_COORDINATOR)
  slices = _int_var(env, "MEGASCALE_NUM_SLICES", minimum=1, default=1)
  if slices > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") or env.get("TPU_PROCESS_ADDRESSES"):
    return dataclasses.replace(auto, source="tpu (JAX detection: multislice or several processes per host)")
  if env.get(_TPU_HOSTS):
    hosts = [h.strip() for h in env[_TPU_HOSTS].split(",") if h.strip()]
    if not hosts:
      raise DistributedEnvError(f"{_TPU_HOSTS}={env[_TPU_HOSTS]!r} names no host")
    if len(hosts) == 1:
      return None
    worker = _int_var(env, _TPU_WORKER_ID, minimum=0)
    _check_id(worker, len(hosts), _TPU_WORKER_ID, f"the {len(hosts)} hosts of {_TPU_HOSTS}")
    host = hosts[0].split(":")[0] if hosts[0].count(":") == 1 else hosts[0]  # drop a libtpu port
    return Settings(_coordinator(env, host, TPU_PORT), len(hosts), worker, source="tpu", **_timeouts(env))
  bounds = env.get("TPU_HOST_BOUNDS")
  if bounds:
    if math.prod(_int(b, "TPU_HOST_BOUNDS", minimum=1) for b in bounds.split(",")) == 1:
      return None  # a single host
  if env.get(_TPU_SKIP_MDS):
    if env.get(_TPU_WORKER_ID) or bounds:
      raise DistributedEnvError(
        f"multi-host TPU slice without {_TPU_HOSTS}, and {_TPU_SKIP_MDS} rules out JAX's metadata detection; "
        f"set {_TPU_HOSTS} and {_TPU_WORKER_ID} (or {', '.join(EXPLICIT_VARS)})"
      )
    return None  # e.g. a single-host GKE TPU pod: nothing to detect
  return auto


def kubernetes(env: Mapping[str, str]) -> Settings | None:
  """Settings of a pod of an Indexed Job or JobSet; None outside one (no JOB_COMPLETION_INDEX).

  Kubernetes sets JOB_COMPLETION_INDEX itself. JobSet puts its names and the job index in pod
  annotations (jobset.sigs.k8s.io/jobset-name, .../replicatedjob-name, .../job-index): expose them as
  JOBSET_NAME, REPLICATED_JOB_NAME and JOB_INDEX through the downward API. Pod 0 of job 0 is then
  `{JOBSET_NAME}-{REPLICATED_JOB_NAME}-0-0.{JOBSET_NAME}` (JobSet's DNS hostnames, default subdomain;
  with another subdomain, set TMLX_COORDINATOR_ADDRESS). Process id: JOB_INDEX x TMLX_PROCESSES_PER_JOB
  (a job's completions; default TMLX_NUM_PROCESSES, one replica) + JOB_COMPLETION_INDEX. On a TPU
  slice (TPU markers) the TPU source decides, even for a single host.
  """
  if not env.get("JOB_COMPLETION_INDEX") or any(env.get(v) for v in TPU_MARKERS):
    return None
  if not env.get(ENV_NUM_PROCESSES):
    raise DistributedEnvError(
      f"{ENV_NUM_PROCESSES} is not set: a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) does not expose its "
      f"pod count; set {ENV_NUM_PROCESSES} to the number of pods (1 for a single process)"
    )
  num = _int_var(env, ENV_NUM_PROCESSES, minimum=1)
  if num == 1:
    return None
  completion = _int_var(env, "JOB_COMPLETION_INDEX", minimum=0)
  jobset, replicated = env.get("JOBSET_NAME"), env.get("REPLICATED_JOB_NAME")
  if bool(jobset) != bool(replicated):
    missing = "REPLICATED_JOB_NAME" if jobset else "JOBSET_NAME"
    raise DistributedEnvError(f"{missing} is not set: a JobSet pod needs both JOBSET_NAME and REPLICATED_JOB_NAME")
  if not jobset:
    if not env.get(ENV_COORDINATOR):
      raise DistributedEnvError(
        f"{ENV_COORDINATOR} is not set: a plain Indexed Job has no known coordinator; set it to pod 0's "
        "stable name, e.g. <job>-0.<headless service>:PORT"
      )
    _check_id(completion, num, "JOB_COMPLETION_INDEX", ENV_NUM_PROCESSES)
    address = _check_address(env[ENV_COORDINATOR], ENV_COORDINATOR)
    return Settings(address, num, completion, source="kubernetes indexed job", **_timeouts(env))
  job_index = _int_var(env, "JOB_INDEX", minimum=0, default=0)
  per_job = _int_var(env, ENV_PROCESSES_PER_JOB, minimum=1, default=num)
  _check_id(
    completion,
    per_job,
    "JOB_COMPLETION_INDEX",
    ENV_PROCESSES_PER_JOB if env.get(ENV_PROCESSES_PER_JOB) else ENV_NUM_PROCESSES,
  )
  pid = job_index * per_job + completion
  _check_id(pid, num, f"JOB_INDEX x {ENV_PROCESSES_PER_JOB} + JOB_COMPLETION_INDEX", ENV_NUM_PROCESSES)
  host = f"{jobset}-{replicated}-0-0.{jobset}"
  return Settings(_coordinator(env, host, K8S_PORT), num, pid, source="kubernetes jobset", **_timeouts(env))


# Tried in order; each returns Settings, None (not its environment) or raises DistributedEnvError.
DETECTORS: tuple[Callable[[Mapping[str, str]], Settings | None], ...] = (explicit, slurm, tpu, kubernetes)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings | None:
  """The first detector's settings for `env` (default os.environ); None for a single process."""
  env = os.environ if env is None else env
  for detect in DETECTORS:
    settings = detect(env)
    if settings is not None:
      return settings
  return None


def _device_ids(raw: Sequence[int | str], name: str) -> tuple[int, ...]:
  ids = tuple(_int(str(i).strip(), name, minimum=0) for i in raw)
  if not ids or len(set(ids)) != len(ids):
    raise DistributedEnvError(f"{name}={','.join(map(str, raw))!r} must list distinct device indices")
  return ids


def resolve(env: Mapping[str, str] | None = None, overrides: Overrides | None = None) -> Settings | None:
  """Settings from tmlx.main's flags where given (all three, or none), else from `env`.

  --local_device_ids alone replaces the detected source's choice.
  """
  o = overrides or Overrides()
  env = os.environ if env is None else env
  values = {
    "--coordinator_address": o.coordinator_address,
    "--num_processes": o.num_processes,
    "--process_id": o.process_id,
  }
  given = [k for k, v in values.items() if v is not None]
  device_ids = None if o.local_device_ids is None else _device_ids(o.local_device_ids, "--local_device_ids")
  if given and len(given) < len(values):
    missing = [k for k in values if k not in given]
    raise DistributedEnvError(
      f"{', '.join(given)} given but {', '.join(missing)} missing: give all three flags (they override "
      "the environment) or none"
    )
  if given:
    num = _int(str(o.num_processes), "--num_processes", minimum=1)
    pid = _int(str(o.process_id), "--process_id", minimum=0)
    if pid >= num:
      raise DistributedEnvError(f"--process_id={pid} must be below --num_processes={num}")
    address = _check_address(o.coordinator_address, "--coordinator_address")
    return Settings(address, num, pid, local_device_ids=device_ids, source="flags", **_timeouts(env))
  settings = settings_from_env(env)
  if device_ids is not None:
    if settings is None:
      raise DistributedEnvError(
        "--local_device_ids given, but neither flags nor environment describe a multi-process job"
      )
    settings = dataclasses.replace(settings, local_device_ids=device_ids, source=f"{settings.source} + flags")
  return settings
