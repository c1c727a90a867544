#!/usr/bin/env bash
# Part of vldm: brings up the local test/demo SLURM cluster (see tests/conftest.py, scripts/demo.sh).
# Bring up a real single-node SLURM cluster (slurmctld + slurmd + munged) on localhost.
# Idempotent: safe to run repeatedly; installs packages only if missing, rewrites
# slurm.conf only if it changed, starts only daemons that are not already answering.
# Needs root. Tested on Debian bookworm (slurm-wlm 22.05.8), no systemd as PID 1, 2 CPUs.
#
# Env knobs:
#   SLURM_ROOT   runtime dir for state/spool/logs/pids (default /tmp/slurm)
#   SLURM_CONF   config path (default /etc/slurm/slurm.conf, the path the clients read by default)
#   SLURM_NODES  "single" (default: one node named `hostname -s`) or a number N>=2 for N
#                fake nodes n1..nN on 127.0.0.1 (multiple slurmd per host; see notes), or "netns": one
#                node per emulated host of scripts/hosts_up.sh, named in SLURM_NETNS_HOSTS ("vldm6-h0 vldm6-h1"),
#                each slurmd inside its host's network namespace at the host's address, slurmctld here at
#                SLURM_CTLD_ADDR (the hosts' bridge address): see docs/multi-node.md
#   SLURM_CPUS   CPUs advertised per node (default: nproc)
#   SLURM_CGROUP 1 = proctrack/cgroup + task/cgroup (cgroup v1; enforces --mem and CPU binding).
#                Default 0 = proctrack/linuxproc + task/none (works without any cgroup access).
#   SLURM_PORT_BASE  ports of this cluster: slurmctld B, slurmd B+1, fake node i B+10+i (default: SLURM's
#                6817/6818 and 17000+i). With their own SLURM_ROOT and SLURM_CONF, clusters of different
#                bases run side by side on one machine (tests/conftest.py: one per checkout).
#   SLURM_FIRST_JOB_ID  the first job id (default 1). Clusters side by side on one host's loopback take
#                different ranges (tests/conftest.py: 1000 K + 1): slurm/train_temporal.sbatch derives its
#                rendezvous port from the job id, so two clusters' job 1 would both listen on 127.0.0.1:20001.
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/slurm}
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
SLURM_NODES=${SLURM_NODES:-single}
SLURM_CPUS=${SLURM_CPUS:-$(nproc)}
SLURM_CGROUP=${SLURM_CGROUP:-0}
CTLD_PORT=${SLURM_PORT_BASE:-6817}
SLURMD_PORT=$(( ${SLURM_PORT_BASE:-6817} + 1 ))
if [ -n "${SLURM_PORT_BASE:-}" ]; then NODE_PORT_BASE=$((SLURM_PORT_BASE + 10)); else NODE_PORT_BASE=17000; fi
log() { echo "[slurm_local_up] $(date +%T) $*" >&2; }

# ---------------------------------------------------------------- 1. packages
missing() { ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; }
if missing; then
  # side-by-side clusters (`pytest -n 2`: one per worker) come up at once: one installs, the other waits
  exec 8>/tmp/vldm_slurm_install.lock
  flock 8
  if missing; then
    log "installing slurm-wlm + munge"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only if the lists are missing the package (fresh image)
    apt-cache show slurm-wlm >/dev/null 2>&1 || apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends slurm-wlm munge >/dev/null
  fi
  flock -u 8
  exec 8>&-
fi

# ---------------------------------------------------------------- 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  # run as the munge user, as the packaged systemd unit does (key and dirs are owned by munge)
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
fi

# ---------------------------------------------------------------- 3. config
mkdir -p "$SLURM_ROOT"/{state,spool,log,run} "$(dirname "$SLURM_CONF")"
HOST=$(hostname -s)
# job scripts use MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -1): names must resolve
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
# memory slurmd sees (MB), minus 5% head-room so a slightly smaller CI box does not drain the node
MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
MEM=$(( ${MEM:-4096} * 95 / 100 ))

CTLD_ADDR=${SLURM_CTLD_ADDR:-127.0.0.1}
if [ "$SLURM_NODES" = single ]; then
  NODELINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS RealMemory=$MEM State=UNKNOWN"
  NODENAMES=$HOST
elif [ "$SLURM_NODES" = netns ]; then
  NODELINES=""; NODENAMES=${SLURM_NETNS_HOSTS:?SLURM_NODES=netns needs SLURM_NETNS_HOSTS}
  nhosts=$(echo $NODENAMES | wc -w)
  per_mem=$(( MEM / nhosts ))
  for n in $NODENAMES; do
    [ -e "/run/netns/$n" ] || { log "no network namespace $n (scripts/hosts_up.sh)"; exit 1; }
    addr=$(getent hosts "$n" | awk '{print $1; exit}')
    [ -n "$addr" ] || { log "host name $n does not resolve"; exit 1; }
    # every slurmd in its own namespace: all of them on the one SlurmdPort, at their host's address
    NODELINES+="NodeName=$n NodeAddr=$addr CPUs=$SLURM_CPUS RealMemory=$per_mem State=UNKNOWN"$'\n'
  done
else
  NODELINES=""; NODENAMES=""
  per_mem=$(( MEM / SLURM_NODES ))
  for i in $(seq 1 "$SLURM_NODES"); do
    NODELINES+="NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i)) CPUs=$SLURM_CPUS RealMemory=$per_mem State=UNKNOWN"$'\n'
    NODENAMES+="n$i "
  done
  # fake node names must resolve (scripts do MASTER_ADDR=$(scontrol show hostnames ... | head -1))
  for n in $NODENAMES; do
    grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done
fi

if [ "$SLURM_CGROUP" = 1 ]; then
  PROCTRACK="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024"
  cat > "$(dirname "$SLURM_CONF")/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
EOF
else
  # no systemd/cgroup delegation needed: track by process tree, no task binding
  PROCTRACK="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectTypeParameters=CR_Core"
  rm -f "$(dirname "$SLURM_CONF")/cgroup.conf"
fi

NEWCONF=$(cat <<EOF
# generated by slurm_local_up.sh -- single-host test cluster
ClusterName=localci
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs become eligible again after cred_expire+1 s (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool/%n
SlurmctldPidFile=$SLURM_ROOT/run/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
$PROCTRACK
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_ROOT/log/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
# fast turnaround for tests
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
# SLURM's default: TERM -> KILL 30 s (a time limit's stop checkpoint needs one step + one save to fit)
KillWait=30
FirstJobId=${SLURM_FIRST_JOB_ID:-1}
Waittime=0
JobRequeue=1
$NODELINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
CONF_CHANGED=0
if [ ! -f "$SLURM_CONF" ] || [ "$(cat "$SLURM_CONF")" != "$NEWCONF" ]; then
  log "writing $SLURM_CONF"
  printf '%s\n' "$NEWCONF" > "$SLURM_CONF"
  CONF_CHANGED=1
fi

# ---------------------------------------------------------------- 4. daemons
# pid file exists and names a live, non-zombie process (PID 1 here reaps daemon exits lazily)
alive() { [ -f "$1" ] && case "$(ps -o stat= -p "$(cat "$1" 2>/dev/null)" 2>/dev/null)" in ""|Z*) false;; *) true;; esac; }

if [ "$CONF_CHANGED" = 1 ] && alive "$SLURM_ROOT/run/slurmctld.pid"; then
  log "config changed: restarting cluster"
  scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 100); do alive "$SLURM_ROOT/run/slurmctld.pid" || break; sleep 0.1; done
fi

if ! alive "$SLURM_ROOT/run/slurmctld.pid"; then
  log "starting slurmctld"
  # -i: ignore unreadable/incompatible state files (e.g. after a config change)
  slurmctld -i
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
scontrol ping | grep -q 'is UP' || { log "slurmctld did not come up"; tail -20 "$SLURM_ROOT/log/slurmctld.log"; exit 1; }

for n in $NODENAMES; do
  if ! alive "$SLURM_ROOT/run/slurmd-$n.pid"; then
    log "starting slurmd for $n"
    mkdir -p "$SLURM_ROOT/spool/$n"
    if [ "$SLURM_NODES" = single ]; then slurmd
    elif [ "$SLURM_NODES" = netns ]; then
      # on its host: its network namespace, and its host name (jobs' `hostname`, gloo, Ray see it)
      nsenter --net="/run/netns/$n" unshare --uts sh -c 'hostname "$0" && exec slurmd -N "$0"' "$n"
    else slurmd -N "$n"; fi
  fi
done

# ---------------------------------------------------------------- 5. wait for idle nodes
for _ in $(seq 150); do
  bad=$(sinfo -h -N -o '%N %t' | awk '$2 !~ /^(idle|mix|alloc)$/' || true)
  [ -z "$bad" ] && break
  # a node left DOWN/DRAIN by a previous run: put it back
  for n in $(echo "$bad" | awk '$2 ~ /down|drain|drng|fail/ {print $1}'); do
    scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
  done
  sleep 0.2
done
sinfo -N -l >&2
[ -z "$(sinfo -h -N -o '%N %t' | awk '$2 !~ /^(idle|mix|alloc)$/')" ] || { log "nodes not idle"; exit 1; }
log "cluster up"
