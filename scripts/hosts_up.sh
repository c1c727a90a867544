#!/usr/bin/env bash
# Part of vldm: N emulated hosts on this machine for multi-node tests (tests/multihost.py, docs/multi-node.md).
#
#   scripts/hosts_up.sh N        # hosts vldm<K>-h0 .. vldm<K>-h<N-1>, K = VLDM_TEST_CLUSTER_ID (default 0)
#   scripts/hosts_exec.sh I CMD  # run CMD "on" host I (its network namespace and its own hostname)
#   scripts/hosts_down.sh        # stop every process on those hosts, remove everything hosts_up created
#
# A host is a network namespace (own interfaces, addresses, ports, routes; the file system and the process
# table stay shared, so a run directory or a venv is "on a shared file system" as on a cluster) plus, for
# what hosts_exec.sh starts, a UTS namespace whose hostname is the host's name (gloo, Ray and `hostname`
# then see a real host name that resolves to the host's own address). The hosts sit on a bridge
# vldm<K>-br with one veth pair per host: host i is 10.213.K.(10+i)/24 on its eth0, the bridge itself
# (this machine's root namespace, where slurmctld and the tests run) is 10.213.K.1, named vldm<K>-ctl.
# Names resolve through /etc/hosts lines that end with the marker "# vldm-hosts K" (hosts_down removes
# exactly those). Existing interfaces and routes are never touched: the only route added is the bridge's
# own connected /24.
#
# Idempotent (every step checks first, so a rerun after an interrupted one completes it) and needs root.
# VLDM_HOSTS_SUBNET=a.b.c overrides the /24 (default 10.213.K).
set -euo pipefail
N=${1:?usage: hosts_up.sh N  (number of hosts, 1-50)}
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 1 ] && [ "$N" -le 50 ] || { echo "hosts_up.sh: N must be 1-50, got $N" >&2; exit 2; }
K=${VLDM_TEST_CLUSTER_ID:-0}
[[ "$K" =~ ^[0-9]$ ]] || { echo "hosts_up.sh: VLDM_TEST_CLUSTER_ID must be 0-9, got $K" >&2; exit 2; }
P=vldm$K
NET=${VLDM_HOSTS_SUBNET:-10.213.$K}
BR=$P-br
MARK="# vldm-hosts $K"
log() { echo "[hosts_up] $(date +%T) $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "hosts_up.sh: needs root (ip netns, ip link)" >&2; exit 1; }
command -v ip >/dev/null || { echo "hosts_up.sh: needs iproute2 (ip)" >&2; exit 1; }

# the subnet must be free: never shadow an address or route that exists outside this harness
if ip -4 route show | grep -v "dev $BR " | grep -q "^$NET\.0/24"; then
  echo "hosts_up.sh: $NET.0/24 is already routed by another interface: set VLDM_HOSTS_SUBNET" >&2; exit 1
fi

# ------------------------------------------------------------------------------ bridge (the "switch")
if ! ip link show "$BR" >/dev/null 2>&1; then
  log "creating bridge $BR ($NET.1/24)"
  ip link add "$BR" type bridge
fi
ip -4 addr show dev "$BR" | grep -q "inet $NET.1/24" || ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up

# ------------------------------------------------------------------------------ hosts
for ((i = 0; i < N; i++)); do
  NS=$P-h$i
  V=$P-v$i          # root side, on the bridge
  ADDR=$NET.$((10 + i))
  [ -e "/run/netns/$NS" ] || { log "creating host $NS ($ADDR)"; ip netns add "$NS"; }
  if ! ip -n "$NS" link show eth0 >/dev/null 2>&1; then
    ip link del "$V" >/dev/null 2>&1 || true   # half-made pair of an interrupted run
    ip link add "$V" type veth peer name "$P-p$i"
    ip link set "$P-p$i" netns "$NS"
    ip -n "$NS" link set "$P-p$i" name eth0
  fi
  ip link set "$V" master "$BR"
  ip link set "$V" up
  ip -n "$NS" -4 addr show dev eth0 | grep -q "inet $ADDR/24" || ip -n "$NS" addr add "$ADDR/24" dev eth0
  ip -n "$NS" link set eth0 up
  ip -n "$NS" link set lo up   # Ray, gloo and SLURM also talk to 127.0.0.1 inside a host
done

# ------------------------------------------------------------------------------ names
# one flock for every writer of /etc/hosts among these scripts; rewritten in place (it is often a bind mount)
exec 9>/run/vldm-hosts.lock
flock 9
WANT=$(
  echo "$NET.1 $P-ctl $MARK"
  for ((i = 0; i < N; i++)); do echo "$NET.$((10 + i)) $P-h$i $MARK"; done
)
HAVE=$(grep -F -- "$MARK" /etc/hosts | grep -E -- "$MARK\$" || true)
if [ "$WANT" != "$HAVE" ]; then
  log "writing $N host name(s) to /etc/hosts"
  OTHER=$(grep -vE -- "$MARK\$" /etc/hosts || true)
  printf '%s\n%s\n' "$OTHER" "$WANT" > /etc/hosts
fi
flock -u 9

# ------------------------------------------------------------------------------ check
for ((i = 0; i < N; i++)); do
  ip netns exec "$P-h$i" ping -c 1 -W 5 "$NET.1" >/dev/null 2>&1 \
    || { command -v ping >/dev/null || break; log "host $P-h$i cannot reach the bridge $NET.1"; exit 1; }
done
log "$N host(s) up: $(for ((i = 0; i < N; i++)); do printf '%s=%s ' "$P-h$i" "$NET.$((10 + i))"; done)"
