#!/usr/bin/env bash
# Part of vldm: run a command "on" emulated host I of scripts/hosts_up.sh (same VLDM_TEST_CLUSTER_ID):
# inside its network namespace, with its host name (a UTS namespace of its own), e.g.
# (nsenter, not `ip netns exec`: that one remounts /sys, which hides /sys/fs/cgroup from slurmd)
#   scripts/hosts_exec.sh 1 hostname --ip-address      # 10.213.K.11
#   scripts/hosts_exec.sh 0 slurmd -N vldm6-h0
set -euo pipefail
I=${1:?usage: hosts_exec.sh I CMD [ARGS...]}
shift
K=${VLDM_TEST_CLUSTER_ID:-0}
NS=vldm$K-h$I
[ -e "/run/netns/$NS" ] || { echo "hosts_exec.sh: no host $NS (run scripts/hosts_up.sh first)" >&2; exit 1; }
exec nsenter --net="/run/netns/$NS" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$NS" "$@"
