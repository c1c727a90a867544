"""The demo's SLURM path: submit slurm/train_temporal.sbatch to a running cluster and wait for it.

Used only when `scontrol ping` answers and enough nodes are idle (a busy shared cluster would make the
demo wait in the queue); otherwise the demo runs the same script with bash on 2 local ranks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

FINAL_OK = {"COMPLETED"}
FINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _out(cmd: list[str], timeout: float = 10) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cluster_ready(min_nodes: int = 2) -> bool:
    """A controller answers and at least `min_nodes` nodes are idle."""
    if not shutil.which("scontrol") or "is UP" not in _out(["scontrol", "ping"]):
        return False
    idle = [ln for ln in _out(["sinfo", "-h", "-N", "-o", "%N %t"]).splitlines() if ln.split()[-1:] == ["idle"]]
    return len(idle) >= min_nodes


def job_state(job: str) -> str:
    m = re.search(r"JobState=(\S+)", _out(["scontrol", "show", "job", "-o", job]))
    return m.group(1) if m else ""


def submit_and_wait(
    script: str,
    args: list[str],
    log: Path,
    env: dict,
    cwd: str,
    show: str | None = None,
    nodes: int = 2,
    timeout: float = 3600,
) -> None:
    """sbatch on `nodes` CPU nodes (one rank each), follow its log, return when it has COMPLETED.

    A requeue (preemption) is followed too: the job keeps its id and appends to the same log.
    Polls `scontrol show job` every 0.5 s (`sbatch --wait` backs off to ~30 s polls).
    """
    from vldm.demo.procs import StageFailed

    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--gres=none",
        "--time=01:00:00",
        f"--output={log}",
        "--open-mode=append",
        script,
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
    if res.returncode != 0:
        raise StageFailed(f"sbatch failed: {res.stderr.strip()}")
    job = res.stdout.strip().split(";")[0]
    print(f"    submitted SLURM job {job} (log {log})", flush=True)
    pattern = re.compile(show) if show else None
    pos, end, state = 0, time.time() + timeout, ""
    while time.time() < end:
        state = job_state(job)
        if log.exists() and pattern:
            with open(log) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            for line in chunk.splitlines():
                if pattern.search(line):
                    print("    " + line.rstrip(), flush=True)
        if state in FINAL_OK:
            return
        if state in FINAL_BAD:
            tail = "".join(open(log).readlines()[-40:]) if log.exists() else ""
            raise StageFailed(f"SLURM job {job} ended {state}; log: {log}\n{tail}")
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True)
    raise StageFailed(f"SLURM job {job} did not finish in {timeout:.0f} s (last state {state or 'unknown'}); cancelled")
