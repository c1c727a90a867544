"""Fixtures for multi-node tests on one machine: emulated hosts (network namespaces on a bridge, see
scripts/hosts_up.sh) and a real SLURM cluster with one slurmd per host. Import the fixtures into a test
module (`from multihost import multihost_slurm`); docs/multi-node.md describes the harness.

The cluster is this checkout's own (VLDM_TEST_CLUSTER_ID=K): hosts vldm<K>-h0.., subnet 10.213.K.0/24,
SLURM state under /tmp/slurm_vldm_<K>_hosts, slurmctld port B+300 (B = conftest's port base), so it runs
beside the single-host cluster of the same session. Everything is torn down after the session, also when
a test (or the setup itself) failed; set VLDM_KEEP_CLUSTERS=1 to leave it up while developing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
K = os.environ.get("VLDM_TEST_CLUSTER_ID", "") or "0"
PREFIX = f"vldm{K}"
NHOSTS = 2
SLURM_ROOT = f"/tmp/slurm_vldm_{K}_hosts"
# conftest's port base of this checkout (61000 + 400 K); slurm_local_up's single-host cluster has B+200
PORT_BASE = (61000 + 400 * int(K)) if K != "0" else 60600


@dataclass
class MultiHost:
    hosts: list[str]  # SLURM node names = host names = network namespace names
    addrs: dict[str, str]  # host name -> its address on the hosts' network
    ctl_addr: str  # the bridge: where slurmctld (and this test process) is reached from the hosts
    env: dict  # environment for sbatch/scontrol/srun (this cluster's SLURM_CONF) and the job's python
    up_env: dict  # slurm_local_up.sh's environment for this cluster

    def restore(self) -> None:
        """Bring a lost host back: its slurmd restarted in its namespace, its node RESUMEd (idempotent)."""
        subprocess.run(
            ["bash", str(SCRIPTS / "hosts_up.sh"), str(len(self.hosts))], env=self.env, check=True, timeout=120
        )
        # a node whose slurmd died stays "idle*" (not responding) until SlurmdTimeout: mark it down first,
        # so slurm_local_up's wait loop RESUMEs it as soon as the new slurmd registered
        for h in self.hosts:
            if not self._slurmd_alive(h):
                down = ["scontrol", "update", f"NodeName={h}", "State=DOWN", "Reason=restore"]
                subprocess.run(down, env=self.env, capture_output=True, timeout=30)
        subprocess.run(["bash", str(SCRIPTS / "slurm_local_up.sh")], env=self.up_env, check=True, timeout=600)

    def _slurmd_alive(self, host: str) -> bool:
        pidfile = Path(SLURM_ROOT) / "run" / f"slurmd-{host}.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
            return Path(f"/proc/{pidfile.read_text().strip()}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, ValueError):
            return False

    def exec(self, i: int, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a command on host i (scripts/hosts_exec.sh)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        kw.setdefault("env", self.env)
        return subprocess.run(["bash", str(SCRIPTS / "hosts_exec.sh"), str(i), *cmd], **kw)

    def netns_pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.hosts[i]], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def slurm_log(self, name: str) -> str:
        p = Path(SLURM_ROOT) / "log" / name
        return p.read_text(errors="replace") if p.exists() else ""


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["VLDM_TEST_CLUSTER_ID"] = K
    env["SLURM_ROOT"] = SLURM_ROOT
    env["SLURM_CONF"] = f"{SLURM_ROOT}/slurm.conf"
    env["SLURM_PORT_BASE"] = str(PORT_BASE + 300)
    return env


def _why_no_namespaces() -> str | None:
    """None if this machine can create network namespaces, else the reason (the tests skip with it)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return "network namespaces and slurmd need root"
    for tool in ("ip", "nsenter", "unshare"):  # SLURM itself: the fixture installs it (slurm_local_up.sh)
        if not shutil.which(tool):
            return f"{tool} is not installed"
    probe = f"{PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _down(env: dict) -> None:
    subprocess.run(["bash", str(SCRIPTS / "slurm_local_down.sh")], env=env, capture_output=True, timeout=180)
    subprocess.run(["bash", str(SCRIPTS / "hosts_down.sh")], env=env, capture_output=True, timeout=180)


@pytest.fixture(scope="session")
def multihost_slurm():
    """Two emulated hosts and a SLURM cluster over them: slurmctld in this (root) namespace at the bridge
    address, slurmd -N <host> inside each host's namespace. Yields a MultiHost."""
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    env = _env()
    hosts = [f"{PREFIX}-h{i}" for i in range(NHOSTS)]
    try:
        subprocess.run(["bash", str(SCRIPTS / "hosts_up.sh"), str(NHOSTS)], env=env, check=True, timeout=120)
        up = {
            **env,
            "SLURM_NODES": "netns",
            "SLURM_NETNS_HOSTS": " ".join(hosts),
            "SLURM_CTLD_ADDR": f"10.213.{K}.1",
            "SLURM_CPUS": str(os.cpu_count() or 2),
        }
        subprocess.run(["bash", str(SCRIPTS / "slurm_local_up.sh")], env=up, check=True, timeout=600)
        addrs = {h: f"10.213.{K}.{10 + i}" for i, h in enumerate(hosts)}
        yield MultiHost(hosts, addrs, f"10.213.{K}.1", env, up)
    finally:
        if os.environ.get("VLDM_KEEP_CLUSTERS") != "1":
            _down(env)


def scontrol_job(env: dict, job: str, name: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(name + "=")), "")


def wait_job(env: dict, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = scontrol_job(env, job, "JobState")
        if st in states:
            return st
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise TimeoutError(f"job {job} still {scontrol_job(env, job, 'JobState')} after {timeout} s")


# ------------------------------------------------------------------------------------------ Ray
RAY_GCS_PORT = 6379  # inside the hosts' namespaces: their own port space, Ray's defaults are free
RAY_DASHBOARD_PORT = 8265
RAY_TEMP = f"/tmp/ray_vldm{K}_hosts"  # one session dir for the cluster's nodes (socket names get suffixes)


def host_ray_procs(mh: MultiHost, i: int) -> list[tuple[int, str]]:
    """Live Ray processes (gcs, raylet, agents, workers, `ray start`) inside host i's namespace."""
    out = []
    for pid in mh.netns_pids(i):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if stat != "Z" and any(k in cmd for k in ("/ray/", "ray::", "/bin/ray ", "raylet", "gcs_server")):
            out.append((pid, cmd))
    return out


def stop_host_ray(mh: MultiHost, timeout: float = 5) -> None:
    """Stops the Ray processes inside the hosts' namespaces only (`ray stop` would stop every Ray of the machine)."""
    deadline = time.time() + timeout
    sig = 15
    while True:
        left = [p for i in range(len(mh.hosts)) for p, _ in host_ray_procs(mh, i)]
        if not left:
            return
        if time.time() > deadline:
            sig = 9
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        time.sleep(0.5)


@pytest.fixture()
def multihost_ray(multihost_slurm):
    """A Ray cluster over the two hosts: the head (GCS, job server) on host 0 at its bridge address, a worker
    node on host 1 joining over the network, one CPU each. Yields the job server's URL; stops both nodes."""
    mh = multihost_slurm
    head = mh.addrs[mh.hosts[0]]
    env = {**mh.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus=1", f"--object-store-memory={100 * 1024 * 1024}", "--disable-usage-stats"]
    url = f"http://{head}:{RAY_DASHBOARD_PORT}"

    def start(i: int, *args: str) -> subprocess.CompletedProcess:
        # `ray start` gives up when its raylet has not registered with the GCS within 30 s (fixed in Ray; seen at
        # load ~100 in the suite): what the failed try left on the host is killed and it is tried again
        for _ in range(3):
            r = mh.exec(i, ray, "start", *args, *common, env=env, timeout=300)
            if r.returncode == 0:
                return r
            left = [str(pid) for pid, _ in host_ray_procs(mh, i)]
            if left:
                subprocess.run(["kill", "-9", *left], timeout=30)
            time.sleep(2)
        return r

    try:
        subprocess.run(["rm", "-rf", RAY_TEMP], timeout=60)
        h = start(
            0,
            "--head",
            f"--node-ip-address={head}",
            f"--port={RAY_GCS_PORT}",
            "--dashboard-host=0.0.0.0",
            f"--dashboard-port={RAY_DASHBOARD_PORT}",
            f"--temp-dir={RAY_TEMP}",
        )
        assert h.returncode == 0, h.stdout[-3000:] + h.stderr[-3000:]
        w = start(1, f"--address={head}:{RAY_GCS_PORT}")
        assert w.returncode == 0, w.stdout[-3000:] + w.stderr[-3000:]
        yield url
    finally:
        stop_host_ray(mh)
        subprocess.run(["rm", "-rf", RAY_TEMP], timeout=60)
