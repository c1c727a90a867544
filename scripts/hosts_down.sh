#!/usr/bin/env bash
# Part of vldm: tear down the emulated hosts of scripts/hosts_up.sh (same VLDM_TEST_CLUSTER_ID).
# Every process that runs inside one of the hosts' network namespaces (slurmd, job steps, Ray nodes: only
# hosts_exec.sh starts anything there) gets SIGTERM, then SIGKILL after HOSTS_STOP_TIMEOUT_S (default 10);
# then the namespaces, their veth pairs, the bridge and the marked /etc/hosts lines go. Idempotent; safe to
# run when nothing, or half of it, is up.
set -uo pipefail
K=${VLDM_TEST_CLUSTER_ID:-0}
[[ "$K" =~ ^[0-9]$ ]] || { echo "hosts_down.sh: VLDM_TEST_CLUSTER_ID must be 0-9, got $K" >&2; exit 2; }
P=vldm$K
MARK="# vldm-hosts $K"
log() { echo "[hosts_down] $(date +%T) $*" >&2; }
mapfile -t HOSTS < <(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$P-h[0-9]+\$" || true)

pids() { for ns in "${HOSTS[@]}"; do ip netns pids "$ns" 2>/dev/null; done | grep -v "^$$\$" | sort -u; }
left=$(pids)
if [ -n "$left" ]; then
  log "stopping $(echo "$left" | wc -w) process(es) on ${HOSTS[*]}"
  kill -TERM $left 2>/dev/null || true
  for _ in $(seq $((${HOSTS_STOP_TIMEOUT_S:-10} * 5))); do
    left=$(pids | while read -r p; do case "$(ps -o stat= -p "$p" 2>/dev/null)" in ""|Z*) ;; *) echo "$p";; esac; done)
    [ -z "$left" ] && break
    sleep 0.2
  done
  [ -n "$left" ] && { log "SIGKILL to $left"; kill -KILL $left 2>/dev/null || true; sleep 0.5; }
fi
for ns in "${HOSTS[@]}"; do
  i=${ns#"$P"-h}
  ip link del "$P-v$i" >/dev/null 2>&1 || true   # deletes its peer (eth0 in the namespace) too
  ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
done
# veths whose namespace was already gone
for v in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$P-v[0-9]+\$"); do
  ip link del "$v" >/dev/null 2>&1 || true
done
ip link del "$P-br" >/dev/null 2>&1 || true

exec 9>/run/vldm-hosts.lock
flock 9
if grep -qE -- "$MARK\$" /etc/hosts; then
  OTHER=$(grep -vE -- "$MARK\$" /etc/hosts || true)
  printf '%s\n' "$OTHER" > /etc/hosts
fi
flock -u 9
log "hosts of cluster $K down"
