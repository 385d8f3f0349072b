#!/usr/bin/env bash
# N processes of one tmlx job on this machine (CPU, fake devices), e.g. to try a multi-host setup:
#   launch/local.sh 2 --config=experiments/sample_cpu.py --workdir=workdir/two
# Each process gets 8/N fake devices and its own log (LOG_DIR, default a new temp dir); the
# coordinator and the collectives listen on loopback only. See tmlx/runtime/local_cluster.py.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config=EXPERIMENT --workdir=DIR [--config.x=y ...]" >&2
  exit 2
fi
n="$1"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
exec "$python" -m tmlx.runtime.local_cluster --processes="$n" ${LOG_DIR:+--log_dir="$LOG_DIR"} -- "$@"
