#!/usr/bin/env bash
# A 3-node Ray cluster on this machine (head + 2 workers, own ports, custom resources head/worker1/worker2).
#   cluster/ray-cluster.sh up|down|status|env [--base-port 27000] [--workers 2] [--cpus-per-node 2]
# `down` stops only this cluster's processes (never a plain `ray stop`). See docs/RUNNING_RAY_JOB.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py="$(command -v python3)"; fi
fi
exec "$py" "$here/local_cluster.py" "$@"
