#!/usr/bin/env bash
# Stop the Ray that `VLDM_RAY_PORT_BASE=B scripts/ray_local_up.sh` started, and nothing else: the processes
# naming its temp dir (/tmp/ray_vldm_B) or its GCS address (127.0.0.1:B) on their command line, plus
# their descendants (Ray renames its workers "ray::...", so they are found through their parents).
# SIGTERM, then SIGKILL after RAY_STOP_TIMEOUT_S (default 10); returns once they are gone.
set -euo pipefail
B=${VLDM_RAY_PORT_BASE:?set VLDM_RAY_PORT_BASE to the base the cluster was started with}
python3 - "/tmp/ray_vldm_$B" "127.0.0.1:$B" "${RAY_STOP_TIMEOUT_S:-10}" <<'EOF'
import os, re, signal, sys, time

temp_dir, gcs, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
name_re = re.compile(r"(?:%s(?:/|\x00|$))|(?:(?<![0-9.])%s(?![0-9]))" % (re.escape(temp_dir), re.escape(gcs)))


def procs():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(d)] = (cmd, int(fields[1]), fields[19], fields[0])  # cmdline, ppid, start time, state
        except (OSError, IndexError, ValueError):
            pass
    return out


def targets():
    ps = procs()
    found = {p for p, (cmd, *_rest) in ps.items() if name_re.search(cmd) and p != os.getpid()}
    grew = True
    while grew:
        kids = {p for p, (_, ppid, *_r) in ps.items() if ppid in found and p not in found}
        found |= kids
        grew = bool(kids)
    return {p: ps[p][2] for p in found if ps[p][3] != "Z"}


def alive(tracked):
    ps = procs()
    return {p for p, start in tracked.items() if p in ps and ps[p][2] == start and ps[p][3] != "Z"}


tracked = targets()
for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
    tracked.update(targets())  # agents orphaned by an exiting raylet are caught by their command line
    for p in alive(tracked):
        try:
            os.kill(p, sig)
        except OSError:
            pass
    end = time.time() + wait
    while alive(tracked) and time.time() < end:
        time.sleep(0.2)
    if not alive(tracked):
        break
print(f"stopped {len(tracked)} Ray processes of {temp_dir}")
EOF
rm -rf "/tmp/ray_vldm_$B"
