"""Shared fixtures: real local Ray and SLURM clusters, offline W&B, tiny saved models.

Clusters are machine-wide. A fixture reuses one that is already up and only stops what it started
itself (set VLDM_KEEP_CLUSTERS=1 to leave what it started running, e.g. while developing).

VLDM_TEST_CLUSTER_ID=K (1-9) gives this checkout's test session clusters of its own, so that several
checkouts (or the workers of `pytest -n 2`, which take K+1, K+2) can run their suites on one machine at once
without sharing (or stopping) each other's: a Ray on ports 61000+400K.. (scripts/ray_local_up.sh's
VLDM_RAY_PORT_BASE) and a SLURM cluster with its own slurmctld, slurmd, ports and state under /tmp/slurm_vldm_K
(SLURM_PORT_BASE, SLURM_ROOT, SLURM_CONF, set in this process's environment so that every
sbatch/scontrol/srun of the session talks to it). `make test` (-n 2) thus runs on clusters 1 and 2. Unset and
without -n (a plain `pytest tests`): Ray's and SLURM's default ports, /tmp/slurm, /etc/slurm/slurm.conf.
See docs/testing.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CLUSTER_ID = os.environ.get("VLDM_TEST_CLUSTER_ID", "")
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... under `pytest -n N`
if XDIST_WORKER:
    # each xdist worker gets clusters of its own (K+1, K+2, ... with K = VLDM_TEST_CLUSTER_ID or 0): two
    # workers' tests never share a Ray, a SLURM cluster or an emulated host, so neither can stop or kill
    # what the other one runs
    CLUSTER_ID = str(int(CLUSTER_ID or 0) + 1 + int(XDIST_WORKER.removeprefix("gw")))
    os.environ["VLDM_TEST_CLUSTER_ID"] = CLUSTER_ID  # tests/multihost.py and the scripts read it
if CLUSTER_ID:
    if not (CLUSTER_ID.isdigit() and 1 <= int(CLUSTER_ID) <= 9):
        raise RuntimeError(f"VLDM_TEST_CLUSTER_ID must be 1-9, got {CLUSTER_ID!r}")
    _base = 61000 + 400 * int(CLUSTER_ID)
    os.environ["VLDM_RAY_PORT_BASE"] = str(_base)
    os.environ["SLURM_PORT_BASE"] = str(_base + 200)
    os.environ["SLURM_ROOT"] = f"/tmp/slurm_vldm_{CLUSTER_ID}"
    os.environ["SLURM_CONF"] = f"/tmp/slurm_vldm_{CLUSTER_ID}/slurm.conf"
    # job ids (and so the sbatch script's rendezvous port 20000 + id) of their own: clusters share loopback
    os.environ["SLURM_FIRST_JOB_ID"] = str(1000 * int(CLUSTER_ID) + 1)
VLDM_RAY_PORT_BASE = os.environ.get("VLDM_RAY_PORT_BASE", "")
RAY_GCS_PORT = int(VLDM_RAY_PORT_BASE) if VLDM_RAY_PORT_BASE else 6379
RAY_ADDRESS = f"http://127.0.0.1:{int(VLDM_RAY_PORT_BASE) + 1 if VLDM_RAY_PORT_BASE else 8265}"  # the job server
RAY_GCS = f"127.0.0.1:{RAY_GCS_PORT}"
sys.path.insert(0, str(ROOT))  # data_prep/, ray_jobs/, bench/ are importable as in production


def _ray_up() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{RAY_ADDRESS}/api/version", timeout=2).read()
        return True
    except Exception:
        return False


def _venv_env() -> dict:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head on loopback with the job server on 127.0.0.1:8265 (or this checkout's own ports, see
    VLDM_TEST_CLUSTER_ID). Yields the job server's address."""
    started = False
    if not _ray_up():
        env = _venv_env()
        env.setdefault("RAY_NUM_CPUS", "2")
        env.setdefault("RAY_OBJECT_STORE_BYTES", str(200 * 1024 * 1024))
        subprocess.run(["bash", str(SCRIPTS / "ray_local_up.sh")], check=True, env=env, timeout=180)
        started = True
    yield RAY_ADDRESS
    if started and os.environ.get("VLDM_KEEP_CLUSTERS") != "1":
        # `ray stop` stops every Ray of the machine: a private cluster is stopped by its own ports alone
        down = ["bash", str(SCRIPTS / "ray_local_down.sh")]
        cmd = down if VLDM_RAY_PORT_BASE else [which("ray") or "ray", "stop", "--force"]
        subprocess.run(cmd, env=_venv_env(), capture_output=True, timeout=120)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster: slurmctld + two slurmd as fake nodes n1 and n2 on loopback (needs root); this
    checkout's own one under VLDM_TEST_CLUSTER_ID."""
    if not _is_root():
        pytest.skip("starting slurmctld/slurmd needs root")
    env = _venv_env()
    env["SLURM_NODES"] = "2"
    env.setdefault("SLURM_CPUS", str(os.cpu_count() or 2))
    subprocess.run(["bash", str(SCRIPTS / "slurm_local_up.sh")], check=True, env=env, timeout=600)
    yield {"nodes": ["n1", "n2"], "wait": str(SCRIPTS / "slurm_wait.sh")}
    # The cluster is left up: it is cheap (0.3 s to re-check) and other sessions may share it.


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every directory inside the test's temp dir. Yields WANDB_DIR."""
    d = tmp_path / "wandb_home"
    for var, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        (d / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(d / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield d


def wait_for(pred, timeout: float = 60.0, interval: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("condition not met")


def which(name: str) -> str | None:
    return shutil.which(name, path=_venv_env()["PATH"])


# `make test` runs `pytest -n 2 --dist loadfile`: each module goes whole to one worker (its module fixtures, such
# as the fast demo or a fault module's reference run, are paid once), and the workers take modules in collection
# order. The longest modules go first (fresh-clone durations, seconds, one process at load ~2), so that neither
# worker is left with a long module at the end while the other one idles.
LONGEST_FIRST = (
    "test_demo.py",  # 580: the fast demo and the fast paper on it
    "test_train_faults.py",  # 490
    "test_train_runs.py",  # 280
    "test_multihost.py",  # 270
    "test_train_data_faults.py",  # 175
    "test_curate.py",  # 150
    "test_train_decoder.py",  # 145
    "test_train_buckets.py",  # 140
    "test_train_paper_runs.py",  # 90
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(Path(str(it.fspath)).name, len(rank)))  # stable: the rest keep their order
