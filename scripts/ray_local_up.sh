#!/usr/bin/env bash
# Start a single-node Ray head on loopback with the job server (dashboard) on 127.0.0.1:8265. Idempotent.
# Needs ray[default] (+ ray[data] for ray.data) in the active Python env.
#
# VLDM_RAY_PORT_BASE=B (optional) gives this Ray a private block of ports instead of Ray's defaults: GCS B,
# dashboard / job server B+1, every other port it opens in B..B+199, temp dir /tmp/ray_vldm_B. Several
# such clusters (one per checkout, see tests/conftest.py) then run side by side on one machine.
# Stop one with scripts/ray_local_down.sh (same VLDM_RAY_PORT_BASE), never `ray stop`, which stops them all.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
# Ray rewrites --node-ip-address=127.0.0.1 to the eth0 address unless this is 0 (then it stays on
# loopback, but `ray start --address=...` worker nodes are refused: single-node only).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 turns on token auth for `ray start` as soon as ~/.ray/auth_token exists (any earlier local
# `ray.init()` writes one); the job server then answers 401 to the curl checks below and to token-less
# `ray job submit`. This cluster listens on loopback only: keep auth off unless the caller asks for it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
PORTS=()
DASHBOARD_PORT=8265
if [ -n "${VLDM_RAY_PORT_BASE:-}" ]; then
  B=$VLDM_RAY_PORT_BASE
  DASHBOARD_PORT=$((B + 1))
  # Ray's two otherwise fixed metrics ports are read from the environment only
  export AUTOSCALER_METRIC_PORT=$((B + 9)) DASHBOARD_METRIC_PORT=$((B + 10))
  PORTS=(--port="$B" --ray-client-server-port=$((B + 2)) --dashboard-agent-listen-port=$((B + 3))
         --dashboard-agent-grpc-port=$((B + 4)) --metrics-export-port=$((B + 5)) --node-manager-port=$((B + 6))
         --object-manager-port=$((B + 7)) --runtime-env-agent-port=$((B + 8))
         --min-worker-port=$((B + 20)) --max-worker-port=$((B + 199)) --temp-dir="/tmp/ray_vldm_$B")
fi
URL=http://127.0.0.1:$DASHBOARD_PORT
if curl -sf -o /dev/null "$URL/api/version"; then echo "ray already up at $URL"; exit 0; fi
ray start --head --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --node-ip-address=127.0.0.1 \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats "${PORTS[@]}" \
  ${RAY_OBJECT_STORE_BYTES:+--object-store-memory=$RAY_OBJECT_STORE_BYTES} >"${TMPDIR:-/tmp}/ray_start_${VLDM_RAY_PORT_BASE:-default}.log" 2>&1 \
  || { cat "${TMPDIR:-/tmp}/ray_start_${VLDM_RAY_PORT_BASE:-default}.log"; exit 1; }
for _ in $(seq 60); do curl -sf -o /dev/null "$URL/api/version" && break; sleep 0.5; done
curl -sf "$URL/api/version"; echo
# submit with:  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python data_prep/shard_videos.py ...
# stop with:    ray stop   (≈6 s; with VLDM_RAY_PORT_BASE: scripts/ray_local_down.sh)
