"""Where a process sits in a multi-process job, read from fake SLURM, TPU and Kubernetes environments
(tmlx.runtime.cluster's detectors are pure functions of an env mapping: no cluster, no JAX start-up)."""

import pytest

from tests.helpers import run_main
from tmlx.runtime import cluster as job_env
from tmlx.runtime.cluster import DistributedEnvError, Overrides, expand_counts, expand_hostlist, settings_from_env


def _slurm(**extra) -> dict:
  """srun task 6 of 8 (2 nodes x 4 tasks) of job 4242, on gpu07 and gpu08."""
  env = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_TASKS_PER_NODE": "4(x2)",
  }
  env.update(extra)
  return {k: v for k, v in env.items() if v is not None}


def _slurm_per_node(**extra) -> dict:
  """One task per node, 4 GPUs each: task 1 of 2."""
  layout = {
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
  }
  return _slurm(**{**layout, **extra})


@pytest.mark.parametrize(
  "expr, hosts",
  [
    ("node001", ["node001"]),
    ("a,b", ["a", "b"]),
    ("node[001-003,007],gpu-a[1-2]", ["node001", "node002", "node003", "node007", "gpu-a1", "gpu-a2"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("x[3]y", ["x3y"]),
  ],
)
def test_hostlist(expr, hosts):
  assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["n[1-2", "n1-2]", "n[[1]]", "n[2-1]", "n[a-b]", "n[]", "a,,b", ""])
def test_hostlist_rejects_malformed(expr):
  with pytest.raises(ValueError):
    expand_hostlist(expr)


def test_task_counts():
  assert expand_counts("4(x2),2") == [4, 4, 2]
  assert expand_counts("1") == [1]
  with pytest.raises(ValueError, match="bad task count"):
    expand_counts("4(2)")


def test_slurm_one_process_per_node():
  s = settings_from_env(_slurm_per_node())
  port = job_env.slurm_port(4242)
  assert port == 20000 + 4242 % 12000
  assert (s.coordinator_address, s.num_processes, s.process_id) == (f"gpu07:{port}", 2, 1)
  assert (s.local_device_ids, s.source, s.auto) == (None, "slurm", False)
  assert (s.init_timeout_s, s.heartbeat_timeout_s) == (300, 30)
  s0 = settings_from_env(_slurm_per_node(SLURM_PROCID="0", SLURM_NODEID="0", TMLX_COORDINATOR_PORT="1234"))
  assert (s0.coordinator_address, s0.process_id) == ("gpu07:1234", 0)


@pytest.mark.parametrize(
  "visible, ids, physical",
  [
    (None, (2,), ["2"]),  # the task sees every GPU of the node: its own is the local id
    ("4,5,6,7", (2,), ["6"]),  # indices among the visible devices: index 2 is physical GPU 6
    ("3", None, None),  # SLURM bound one GPU per task already: use what is visible
  ],
)
def test_slurm_one_process_per_gpu(visible, ids, physical):
  env = _slurm(CUDA_VISIBLE_DEVICES=visible)
  s = settings_from_env(env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == (f"gpu07:{job_env.slurm_port(4242)}", 8, 6)
  assert s.local_device_ids == ids
  assert job_env.physical_devices(s.local_device_ids, env) == physical


def test_slurm_layout_variants():
  # Only the job-level compressed form, or no layout variable at all (8 tasks on 2 nodes).
  assert settings_from_env(_slurm(SLURM_STEP_TASKS_PER_NODE=None)).local_device_ids == (2,)
  assert settings_from_env(_slurm(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None)).local_device_ids == (2,)
  assert settings_from_env(_slurm(SLURM_STEP_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="4")).local_device_ids == (2,)
  # Two GPUs per task: task 1 of a node takes indices 2 and 3, unless SLURM already bound them.
  two = _slurm(SLURM_LOCALID="1", SLURM_GPUS_PER_TASK="2", SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_NTASKS="4")
  assert settings_from_env({**two, "SLURM_PROCID": "3"}).local_device_ids == (2, 3)
  assert settings_from_env({**two, "SLURM_PROCID": "3", "CUDA_VISIBLE_DEVICES": "2,3"}).local_device_ids is None
  # The job node list serves when the step's is missing.
  s = settings_from_env(_slurm_per_node(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST="a[2-3]"))
  assert s.coordinator_address.startswith("a2:")


def test_slurm_single_task_and_outside_srun_are_single_process():
  assert settings_from_env(_slurm(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")) is None
  assert settings_from_env(_slurm(SLURM_PROCID=None)) is None  # e.g. an salloc shell: no task


@pytest.mark.parametrize(
  "extra, names",
  [
    ({"SLURM_NTASKS": None}, ["SLURM_NTASKS"]),
    ({"SLURM_NTASKS": "eight"}, ["SLURM_NTASKS"]),
    ({"SLURM_PROCID": "8"}, ["SLURM_PROCID", "SLURM_NTASKS"]),
    ({"SLURM_PROCID": "-1"}, ["SLURM_PROCID"]),
    ({"SLURM_JOB_ID": "x"}, ["SLURM_JOB_ID"]),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, ["SLURM_STEP_NODELIST"]),
    ({"SLURM_STEP_NODELIST": "gpu[07-"}, ["SLURM_STEP_NODELIST"]),
    ({"SLURM_STEP_TASKS_PER_NODE": "4x2"}, ["SLURM_STEP_TASKS_PER_NODE"]),
    ({"SLURM_LOCALID": None}, ["SLURM_LOCALID"]),
    ({"SLURM_LOCALID": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, ["SLURM_LOCALID", "CUDA_VISIBLE_DEVICES"]),
    ({"SLURM_GPUS_PER_TASK": "zero"}, ["SLURM_GPUS_PER_TASK"]),
    ({"TMLX_COORDINATOR_PORT": "70000"}, ["TMLX_COORDINATOR_PORT"]),
    ({"TMLX_COORDINATOR_ADDRESS": "gpu07"}, ["TMLX_COORDINATOR_ADDRESS"]),
    ({"TMLX_INIT_TIMEOUT_S": "0"}, ["TMLX_INIT_TIMEOUT_S"]),
    ({"TMLX_HEARTBEAT_TIMEOUT_S": "soon"}, ["TMLX_HEARTBEAT_TIMEOUT_S"]),
  ],
)
def test_slurm_errors_name_the_variable(extra, names):
  with pytest.raises(DistributedEnvError) as e:
    settings_from_env(_slurm(**extra))
  for name in names:
    assert name in str(e.value)


def _tpu(**extra) -> dict:
  env = {"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2", "TPU_ACCELERATOR_TYPE": "v4-32"}
  env.update(extra)
  return {k: v for k, v in env.items() if v is not None}


def test_tpu_worker_hostnames():
  s = settings_from_env(_tpu())
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("t-0:8482", 4, 2, None)
  assert (s.source, s.auto) == ("tpu", False)
  assert settings_from_env(_tpu(TMLX_COORDINATOR_PORT="9000")).coordinator_address == "t-0:9000"
  # Kubernetes variables of the same GKE pod do not matter: the TPU source decides.
  assert settings_from_env(_tpu(JOB_COMPLETION_INDEX="2")).source == "tpu"


def test_tpu_single_host_is_single_process():
  assert settings_from_env(_tpu(TPU_WORKER_HOSTNAMES="t-0", TPU_WORKER_ID="0")) is None
  assert settings_from_env({"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_HOST_BOUNDS": "1,1,1"}) is None
  # A single-host GKE pod of an Indexed Job: no TMLX_NUM_PROCESSES needed.
  gke = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_SKIP_MDS_QUERY": "true", "JOB_COMPLETION_INDEX": "0"}
  assert settings_from_env(gke) is None


def test_tpu_falls_back_to_jax_detection():
  s = settings_from_env({"TPU_ACCELERATOR_TYPE": "v4-32"})
  assert (s.auto, s.source, s.coordinator_address, s.num_processes, s.process_id) == (
    True,
    "tpu (JAX metadata detection)",
    None,
    None,
    None,
  )
  s = settings_from_env(_tpu(MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1"))
  assert s.auto and "multislice" in s.source
  # A partial override completes JAX's detection.
  s = settings_from_env({"TPU_ACCELERATOR_TYPE": "v4-32", "TMLX_COORDINATOR_ADDRESS": "t-0:1234"})
  assert (s.auto, s.coordinator_address) == (True, "t-0:1234")


@pytest.mark.parametrize(
  "env, names",
  [
    (_tpu(TPU_WORKER_ID=None), ["TPU_WORKER_ID"]),
    (_tpu(TPU_WORKER_ID="4"), ["TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES"]),
    (_tpu(TPU_WORKER_HOSTNAMES=" , "), ["TPU_WORKER_HOSTNAMES"]),
    ({"TPU_HOST_BOUNDS": "1,x,1"}, ["TPU_HOST_BOUNDS"]),
    ({"TPU_WORKER_ID": "1", "TPU_SKIP_MDS_QUERY": "1"}, ["TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY"]),
    ({"MEGASCALE_NUM_SLICES": "0"}, ["MEGASCALE_NUM_SLICES"]),
  ],
)
def test_tpu_errors_name_the_variable(env, names):
  with pytest.raises(DistributedEnvError) as e:
    settings_from_env(env)
  for name in names:
    assert name in str(e.value)


def _jobset(**extra) -> dict:
  env = {
    "JOB_COMPLETION_INDEX": "1",
    "JOBSET_NAME": "train",
    "REPLICATED_JOB_NAME": "workers",
    "JOB_INDEX": "0",
    "TMLX_NUM_PROCESSES": "4",
  }
  env.update(extra)
  return {k: v for k, v in env.items() if v is not None}


def test_kubernetes_jobset():
  s = settings_from_env(_jobset())
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("train-workers-0-0.train:55527", 4, 1)
  assert (s.source, s.local_device_ids) == ("kubernetes jobset", None)
  # Two replicated-job replicas of 2 pods each: pod 1 of job 1 is process 3.
  s = settings_from_env(_jobset(JOB_INDEX="1", TMLX_PROCESSES_PER_JOB="2"))
  assert s.process_id == 3
  s = settings_from_env(_jobset(TMLX_COORDINATOR_ADDRESS="lead.svc:9999", TMLX_COORDINATOR_PORT="1"))
  assert s.coordinator_address == "lead.svc:9999"  # the address wins over a port
  assert settings_from_env(_jobset(TMLX_COORDINATOR_PORT="1234")).coordinator_address.endswith(".train:1234")
  assert settings_from_env(_jobset(TMLX_NUM_PROCESSES="1", JOB_COMPLETION_INDEX="0")) is None


def test_kubernetes_indexed_job():
  env = {"JOB_COMPLETION_INDEX": "2", "TMLX_NUM_PROCESSES": "3", "TMLX_COORDINATOR_ADDRESS": "job-0.svc:5000"}
  s = settings_from_env(env)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == (
    "job-0.svc:5000",
    3,
    2,
    "kubernetes indexed job",
  )


@pytest.mark.parametrize(
  "env, names",
  [
    (_jobset(TMLX_NUM_PROCESSES=None), ["TMLX_NUM_PROCESSES"]),
    (_jobset(JOB_COMPLETION_INDEX="x"), ["JOB_COMPLETION_INDEX"]),
    (_jobset(JOB_COMPLETION_INDEX="4"), ["JOB_COMPLETION_INDEX", "TMLX_NUM_PROCESSES"]),
    (_jobset(JOB_INDEX="1"), ["JOB_INDEX", "TMLX_PROCESSES_PER_JOB"]),  # a second replica needs the job size
    (_jobset(JOB_INDEX="1", TMLX_PROCESSES_PER_JOB="2", JOB_COMPLETION_INDEX="2"), ["TMLX_PROCESSES_PER_JOB"]),
    (_jobset(REPLICATED_JOB_NAME=None), ["REPLICATED_JOB_NAME"]),
    (_jobset(JOBSET_NAME=None), ["JOBSET_NAME"]),
    (_jobset(JOBSET_NAME=None, REPLICATED_JOB_NAME=None), ["TMLX_COORDINATOR_ADDRESS"]),
    ({"JOB_COMPLETION_INDEX": "0", "TMLX_PROCESS_ID": "0"}, ["TMLX_PROCESS_ID"]),  # K8s gives the id
  ],
)
def test_kubernetes_errors_name_the_variable(env, names):
  with pytest.raises(DistributedEnvError) as e:
    settings_from_env(env)
  for name in names:
    assert name in str(e.value)


EXPLICIT = {"TMLX_COORDINATOR_ADDRESS": "10.0.0.1:5000", "TMLX_NUM_PROCESSES": "2", "TMLX_PROCESS_ID": "1"}


def test_explicit_beats_every_cluster_source():
  for cluster in (_slurm(), _tpu(), _jobset()):
    s = settings_from_env({**cluster, **EXPLICIT})
    assert (s.source, s.coordinator_address, s.num_processes, s.process_id) == ("explicit", "10.0.0.1:5000", 2, 1)
  # The coordinator alone overrides the one a cluster source derives.
  s = settings_from_env({**_slurm(), "TMLX_COORDINATOR_ADDRESS": "head:7000"})
  assert (s.source, s.coordinator_address, s.num_processes) == ("slurm", "head:7000", 8)
  # Outside a cluster a partial set is an error.
  with pytest.raises(DistributedEnvError, match="TMLX_NUM_PROCESSES, TMLX_PROCESS_ID missing"):
    settings_from_env({"TMLX_COORDINATOR_ADDRESS": "head:7000"})
  assert settings_from_env({}) is None
  assert set(job_env.EXPLICIT_VARS) <= set(job_env.DETECTED_VARS)
  assert {"SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "JOB_COMPLETION_INDEX", "JOBSET_NAME"} <= set(job_env.DETECTED_VARS)


def test_flags_override_the_environment():
  flags = Overrides(coordinator_address="h:1", num_processes=4, process_id=3, local_device_ids=["0", "1"])
  s = job_env.resolve(_slurm(**EXPLICIT), flags)
  assert (s.source, s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
    "flags",
    "h:1",
    4,
    3,
    (0, 1),
  )
  s = job_env.resolve(_slurm(), Overrides(local_device_ids=["5"]))
  assert (s.source, s.process_id, s.local_device_ids) == ("slurm + flags", 6, (5,))
  assert job_env.resolve({}, Overrides()) is None


@pytest.mark.parametrize(
  "flags, names",
  [
    (Overrides(num_processes=2), ["--coordinator_address", "--process_id"]),
    (Overrides(coordinator_address="h:1", process_id=0), ["--num_processes"]),
    (Overrides(coordinator_address="h", num_processes=2, process_id=0), ["--coordinator_address"]),
    (Overrides(coordinator_address="h:1", num_processes=2, process_id=2), ["--process_id", "--num_processes"]),
    (Overrides(coordinator_address="h:1", num_processes=0, process_id=0), ["--num_processes"]),
    (Overrides(local_device_ids=["a"]), ["--local_device_ids"]),
    (Overrides(local_device_ids=["1", "1"]), ["--local_device_ids"]),
    (Overrides(local_device_ids=["0"]), ["--local_device_ids"]),  # no multi-process job to apply them to
  ],
)
def test_flag_errors_name_the_flag(flags, names):
  with pytest.raises(DistributedEnvError) as e:
    job_env.resolve({}, flags)
  for name in names:
    assert name in str(e.value)


def test_main_rejects_half_given_flags(tmp_path):
  proc = run_main("experiments/sample_cpu.py:tiny", tmp_path / "w", "--num_processes=2", timeout=120)
  assert proc.returncode != 0
  assert "--num_processes given but --coordinator_address, --process_id missing" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
  "expr, hosts",
  [
    ("a,a", ["a", "a"]),
    ("n[1-2],n1", ["n1", "n2", "n1"]),
    (" node1, node2", ["node1", "node2"]),
    ("n[ 1-2]", ["n1", "n2"]),
  ],
)
def test_hostlist_keeps_repeats_and_ignores_whitespace(expr, hosts):
  assert expand_hostlist(expr) == hosts


def test_task_counts_ignore_whitespace():
  assert expand_counts(" 4(x2), 2") == [4, 4, 2]
