#!/usr/bin/env bash
# tmlx on a Cloud TPU VM slice: the same command on every worker of the slice.
#   launch/tpu_vm.sh TPU_NAME ZONE --config=experiments/interaction_276b.py --workdir=gs://BUCKET/runs/a
# First time (SETUP=1): copies this checkout to every worker and installs it there with the TPU
# extra. Workers find their place themselves (tmlx/runtime/cluster.py, JAX's TPU detection); the
# workdir must be a bucket or a disk all workers share.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: [SETUP=1] $0 TPU_NAME ZONE --config=EXPERIMENT --workdir=DIR [--config.x=y ...]" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 2
dir="${REMOTE_DIR:-tmlx}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }
if [[ "${SETUP:-0}" == 1 ]]; then
  root="$(cd "$(dirname "$0")/.." && pwd)"
  git -C "$root" archive --format=tar.gz -o /tmp/tmlx_src.tgz HEAD
  gcloud compute tpus tpu-vm scp /tmp/tmlx_src.tgz "$tpu":/tmp/tmlx_src.tgz --zone="$zone" --worker=all
  ssh_all "mkdir -p $dir && tar -xzf /tmp/tmlx_src.tgz -C $dir && cd $dir && python3 -m venv .venv && \
    .venv/bin/pip install -q -c requirements.lock -e '.[tpu]'"
fi
ssh_all "cd $dir && .venv/bin/python -m tmlx.main $(printf '%q ' "$@")"
