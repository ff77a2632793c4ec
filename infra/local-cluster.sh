#!/usr/bin/env bash
# A Ray head and an MLflow server on this machine, loopback only, for trying `ray job submit`:
#   infra/local-cluster.sh up     # Ray head (all CPUs) on 127.0.0.1, dashboard :8265, MLflow :5000
#   RAY_AUTH_MODE=token .venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       ncsn-pipeline run --config configs/digits.yaml --set tracking.tracking_uri=http://127.0.0.1:5000
#   infra/local-cluster.sh down
# Ray's token authentication stays on (token in ~/.ray/auth_token); clients present it with RAY_AUTH_MODE=token.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE="${NCSN_LOCAL_CLUSTER_STATE:-$PWD/.local-cluster}"   # the MLflow store and the server's pid
BIN=.venv/bin
# The head's own temp dir (sessions, logs, its ray_current_cluster), not /tmp/ray: `down` stops the processes that name
# it and no other Ray of this user. Short, for Ray's Unix socket paths.
RAY_TEMP="${TMPDIR:-/tmp}/ncsn-ray-$(id -u)"
# Keep every Ray process and client on 127.0.0.1 instead of the host's address. The price: Ray 2.60 then refuses
# `ray start --address` (a second node), and without this setting it rewrites 127.0.0.1 to the host's address, so a
# loopback-only cluster here has one node. Two hosts on one machine: tests/test_two_hosts.py (network namespaces joined
# by a virtual cable, as root; docs/cluster.md); a real second machine joins with `ray start --address HEAD:6380`.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

case "${1:-}" in
  up)
    mkdir -p "$STATE"
    export PATH="$PWD/$BIN:$PATH"   # job entrypoints (`ncsn-pipeline …`) run with the head's PATH
    "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port 6380 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --temp-dir "$RAY_TEMP"
    nohup "$BIN/mlflow" server --host 127.0.0.1 --port 5000 --workers 1 \
      --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
      > "$STATE/mlflow.log" 2>&1 &
    echo $! > "$STATE/mlflow.pid"
    echo "Ray dashboard: http://127.0.0.1:8265   MLflow: http://127.0.0.1:5000"
    ;;
  down)
    # this head's processes only (`ray stop` would stop every Ray of this user); its workers exit with its raylet
    if pkill -TERM -f -- "$RAY_TEMP/"; then
      for _ in $(seq 20); do pgrep -f -- "$RAY_TEMP/" > /dev/null || break; sleep 0.5; done
      pkill -KILL -f -- "$RAY_TEMP/" || true
    fi
    if [ -f "$STATE/mlflow.pid" ]; then kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null || true; rm -f "$STATE/mlflow.pid"; fi
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
