"""The local Ray head of the demo and `make paper` (scripts/ray_local_up.sh): find it, start it, stop it.

Shared by vldm.demo.run and vldm.paper.corpora, so that both talk to the same job server and stop only what
they started."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the job server of scripts/ray_local_up.sh: its default port, or its private block under VLDM_RAY_PORT_BASE
PORT_BASE = os.environ.get("VLDM_RAY_PORT_BASE", "")
RAY_ADDRESS = f"http://127.0.0.1:{int(PORT_BASE) + 1 if PORT_BASE else 8265}"


def ray_answers() -> bool:
    """Whether a Ray job server answers at RAY_ADDRESS."""
    try:
        urllib.request.urlopen(f"{RAY_ADDRESS}/api/version", timeout=2).read()
        return True
    except OSError:
        return False


def start_local_ray(env: dict) -> None:
    """A local Ray head (2 CPUs unless RAY_NUM_CPUS says otherwise) with a small object store: the jobs only
    pass small blocks (paths, counts), never frames."""
    env = {**env, "RAY_NUM_CPUS": env.get("RAY_NUM_CPUS", "2")}
    env.setdefault("RAY_OBJECT_STORE_BYTES", str(300 * 1024 * 1024))
    cmd = ["bash", "scripts/ray_local_up.sh"]
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT), timeout=180, stdout=subprocess.DEVNULL)


def stop_local_ray(env: dict) -> None:
    """Stop the local Ray head (unless VLDM_KEEP_CLUSTERS=1): a private one by its ports alone, since `ray stop`
    stops every Ray of the machine."""
    if os.environ.get("VLDM_KEEP_CLUSTERS") == "1":
        return
    cmd = ["bash", "scripts/ray_local_down.sh"] if PORT_BASE else ["ray", "stop", "--force"]
    subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, timeout=120)
