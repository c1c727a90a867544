#!/usr/bin/env bash
# Start a single-node Ray head on loopback with the job server (dashboard) on 127.0.0.1:8265. Idempotent.
# Needs ray[default] (+ ray[data] for ray.data) in the active Python env.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
# Ray rewrites --node-ip-address=127.0.0.1 to the eth0 address unless this is 0 (then it stays on
# loopback, but `ray start --address=...` worker nodes are refused: single-node only).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 turns on token auth for `ray start` as soon as ~/.ray/auth_token exists (any earlier local
# `ray.init()` writes one); the job server then answers 401 to the curl checks below and to token-less
# `ray job submit`. This cluster listens on loopback only: keep auth off unless the caller asks for it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
if curl -sf -o /dev/null http://127.0.0.1:8265/api/version; then echo "ray already up"; exit 0; fi
ray start --head --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --node-ip-address=127.0.0.1 \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 --disable-usage-stats \
  ${RAY_OBJECT_STORE_BYTES:+--object-store-memory=$RAY_OBJECT_STORE_BYTES} >"${TMPDIR:-/tmp}/ray_start.log" 2>&1 \
  || { cat "${TMPDIR:-/tmp}/ray_start.log"; exit 1; }
for _ in $(seq 60); do curl -sf -o /dev/null http://127.0.0.1:8265/api/version && break; sleep 0.5; done
curl -sf http://127.0.0.1:8265/api/version; echo
# submit with:  ray job submit --address http://127.0.0.1:8265 --working-dir . -- python data_prep/shard_videos.py ...
# stop with:    ray stop   (≈6 s)
