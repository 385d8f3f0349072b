"""The launch scripts: valid shell, and the environments they set up are the ones tmlx.runtime.cluster
reads (the 2-process run of launch/local.sh is in tests/test_multiprocess.py)."""

import string
import subprocess

import pytest
import yaml

from tests.helpers import ROOT
from tmlx.runtime import cluster as job_env

LAUNCH = ROOT / "launch"


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "slurm_gpu.sbatch"])
def test_scripts_are_valid_bash_and_executable(script):
  path = LAUNCH / script
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  assert path.stat().st_mode & 0o111


def test_local_sh_usage_error():
  proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), "two"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and "usage:" in proc.stderr


def test_gke_jobset_pods_find_their_place():
  """Each pod of the JobSet, with the variables Kubernetes and the manifest's downward API give it,
  gets a distinct process id and pod 0's stable DNS name as the coordinator."""
  text = string.Template((LAUNCH / "gke_jobset.yaml").read_text()).substitute(
    IMAGE="registry.invalid/tmlx:test", NODES="4", CONFIG="experiments/sample_cpu.py", WORKDIR="/shared/run"
  )
  manifest = yaml.safe_load(text)
  jobset = manifest["metadata"]["name"]
  (rjob,) = manifest["spec"]["replicatedJobs"]
  pod = rjob["template"]["spec"]["template"]["spec"]
  (container,) = pod["containers"]
  annotations = {
    "jobset.sigs.k8s.io/jobset-name": jobset,
    "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
    "jobset.sigs.k8s.io/job-index": "0",
  }
  ids = []
  for index in range(4):
    env = {"JOB_COMPLETION_INDEX": str(index)}  # set by Kubernetes for an Indexed Job
    for var in container["env"]:
      if "value" in var:
        env[var["name"]] = var["value"]
      else:
        path = var["valueFrom"]["fieldRef"]["fieldPath"]
        env[var["name"]] = annotations[path.split("['")[1].rstrip("']")]
    settings = job_env.settings_from_env(env)
    assert settings.coordinator_address == f"{jobset}-{rjob['name']}-0-0.{jobset}:{job_env.K8S_PORT}"
    assert settings.num_processes == 4
    ids.append(settings.process_id)
  assert ids == [0, 1, 2, 3]
  assert container["command"][-1] == "tmlx.main" and container["args"] == [
    "--config=experiments/sample_cpu.py",
    "--workdir=/shared/run",
  ]
