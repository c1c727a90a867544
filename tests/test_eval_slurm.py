"""slurm/eval_pool.sbatch submitted with sbatch to the real local SLURM cluster, beside the shared Ray
cluster on the default ports: one result per checkpoint, exit 0, a resubmission that does nothing,
every port of the job's private Ray inside its own block, and none of its processes left afterwards
(while the shared Ray is untouched).

One node only: on this host Ray stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), where it
refuses worker nodes joining a head, so the script's multi-node path is not exercised here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import RAY_GCS_PORT
from eval_helpers import make_tiny_run

from vldm.eval.wandb_reader import history

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "eval_pool.sbatch"
FAST = [
    "sampling.num_samples=4",
    "sampling.steps=2",
    "val_loss.num_clips=2",
    "val_loss.timesteps=[300,700]",
    "pool.shard_size=2",
    "pool.poll_interval_s=0.2",
]
# the ports a Ray started with defaults uses (the shared cluster): the job's block must avoid them all
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365, 44217, 44227, *range(10002, 20000)}


def _env(tmp: Path) -> dict:
    env = dict(os.environ)  # carries the wandb_offline fixture's WANDB_* settings into the job
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # this host keeps Ray on loopback: without this Ray rewrites 127.0.0.1 to the eth0 address
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        HEAD_IP="127.0.0.1",
        RAY_OBJECT_STORE_BYTES=str(200 * 1024 * 1024),
    )
    return env


def _sbatch(tmp: Path, env: dict, run: Path, *overrides: str) -> str:
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gres=none",
            "--cpus-per-task=2",
            "--time=10",
            "--job-name=vldm-eval-test",
            f"--output={tmp}/slurm-%j.out",
            str(SBATCH),
            "--run-dir",
            str(run),
            "--once",
            "--suite",
            "configs/eval/tiny.yaml",
            *FAST,
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def _job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith(name + "=")), "")


class JobRay:
    """Watches the processes of one job's Ray on this host: the ones naming its temp dir or GCS address,
    and their descendants (agents rename themselves), tracked by (pid, create time) so orphans count."""

    def __init__(self, temp_dir: str, gcs: str):
        # the temp dir as a whole path (/tmp/ray_12 is not /tmp/ray_1), the GCS address as a whole
        self.name_re = re.compile(re.escape(temp_dir) + r"(?:/|\s|$)|(?<![0-9.])" + re.escape(gcs) + r"(?![0-9])")
        self.seen: dict[int, float] = {}
        self.ports: dict[int, str] = {}  # listening TCP port -> process name

    def scan(self) -> None:
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and self.name_re.search(" ".join(p.info["cmdline"] or []) + " "):
                roots.append(p)
        procs = set()
        for r in roots:
            try:
                procs |= {r, *r.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.pid in self.seen:
                try:
                    name = psutil.Process(c.pid).name()
                except psutil.NoSuchProcess:
                    continue
                # srun (its command line names the temp dir) is SLURM's: its I/O ports are random
                # ephemeral ones (slurm.conf SrunPortRange), not Ray's
                if name != "srun":
                    self.ports[c.laddr.port] = name

    def alive(self) -> list[str]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:  # PID 1 here reaps late
                    out.append(f"{pid} {p.name()} {' '.join(p.cmdline())[:200]}")
            except psutil.NoSuchProcess:
                pass
        return out


def _run_job(
    tmp: Path, env: dict, run: Path, *overrides: str, timeout: float = 240, on_log=None, state_exit=("COMPLETED", "0:0")
) -> tuple[str, str, JobRay, int]:
    """Submit, watch the job's Ray while it runs (on_log(job, text) is called at each poll), wait for the
    end state and exit code. -> (job id, log, watcher, port base)."""
    job = _sbatch(tmp, env, run, *overrides)
    log = tmp / f"slurm-{job}.out"
    watch, base, state = None, 0, ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_field(job, "JobState")
        text = log.read_text() if log.exists() else ""
        m = re.search(r"ray ports (\d+)-\d+ \(gcs (\d+),.*temp dir (\S+)", text)
        if m and watch is None:
            base = int(m.group(1))
            watch = JobRay(m.group(3), f"127.0.0.1:{m.group(2)}")
        if watch is not None:
            watch.scan()
        if on_log is not None:
            on_log(job, text)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.3)
    else:
        subprocess.run(["scancel", job], timeout=30)
        raise TimeoutError(
            f"job {job} still {state} after {timeout} s:\n" + (log.read_text()[-4000:] if log.exists() else "")
        )
    text = log.read_text()
    assert (state, _job_field(job, "ExitCode")) == state_exit, text[-5000:]
    assert watch is not None, text[-3000:]
    return job, text, watch, base


def _shared_gcs_pid() -> int | None:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == RAY_GCS_PORT:
            return c.pid
    return None


def _check_private_ray_gone(job: str, text: str, watch: JobRay, base: int) -> None:
    # the job's Ray listened only inside its block, which avoids every default port of the shared Ray
    assert watch.ports and min(watch.ports) >= base and max(watch.ports) < base + 200, (base, watch.ports)
    assert base in watch.ports and base + 1 in watch.ports  # GCS and dashboard of the job
    assert not set(range(base, base + 200)) & RAY_DEFAULT_PORTS
    # all of it stopped by the job itself, orphans included; its temp dir removed
    assert not watch.alive(), watch.alive()
    assert len(watch.seen) >= 6, watch.seen  # gcs, raylet, dashboard, agents, driver, workers were seen
    assert not Path(f"/tmp/ray_{job}").exists()
    listening = {c.laddr.port for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    assert not listening & set(watch.ports), listening & set(watch.ports)
    assert re.search(r"Ray stopped; exit \d+\n", text)


def test_sbatch_eval_pool_once_beside_the_shared_ray(slurm_cluster, ray_cluster, wandb_offline, tmp_path):
    from conftest import _ray_up

    shared_gcs = _shared_gcs_pid()
    assert shared_gcs is not None
    run = make_tiny_run(tmp_path / "tiny")
    env = _env(tmp_path)

    job, text, watch, base = _run_job(tmp_path, env, run)
    assert "2 checkpoint(s) evaluated, 0 failed" in text, text[-4000:]
    results = sorted(run.glob("eval/*/step_*/result.json"))
    assert [p.parent.name for p in results] == ["step_00000100", "step_00000200"]
    assert len({p.parent.parent for p in results}) == 1  # one suite hash dir
    assert {"ema/flicker", "raw/val_loss"} <= set(json.loads(results[1].read_text())["metrics"])
    _check_private_ray_gone(job, text, watch, base)
    assert "Ray stopped; exit 0" in text
    # the shared Ray on the default ports was neither clashed with nor stopped
    assert _ray_up() and _shared_gcs_pid() == shared_gcs
    (wfile,) = wandb_offline.glob("wandb/offline-run-*/run-*.wandb")
    assert sorted(row["trainer/global_step"] for row in history(wfile)) == [100, 200]

    # resubmitted: nothing new evaluated, nothing rewritten, nothing logged
    before = {p: p.stat().st_mtime_ns for p in run.joinpath("eval").rglob("*") if p.is_file() and p.name != ".lock"}
    job2, text2, watch2, base2 = _run_job(tmp_path, env, run)
    assert "0 checkpoint(s) evaluated" in text2 and "shards planned" not in text2, text2[-4000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted(run.glob("eval/*/step_*/result.json")) == results
    assert len(list(wandb_offline.glob("wandb/offline-run-*"))) == 1
    _check_private_ray_gone(job2, text2, watch2, base2)
    assert _ray_up() and _shared_gcs_pid() == shared_gcs


def test_sigterm_to_the_batch_shell_stops_the_pool_then_the_jobs_ray(slurm_cluster, ray_cluster, tmp_path):
    """What --signal=B:TERM@120 does before the time limit: the pool unwinds (exit 143, its shards kept),
    then the job stops its own Ray; the shared Ray is untouched."""
    shared_gcs = _shared_gcs_pid()
    run = make_tiny_run(tmp_path / "tiny")
    sent = []

    def term_once_sampling(job, text):
        if not sent and "shards planned" in text:  # the pool is at work
            subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True, timeout=30)
            sent.append(job)

    # longer shards, so the signal lands while the pool is sampling
    job, text, watch, base = _run_job(
        tmp_path,
        _env(tmp_path),
        run,
        "sampling.steps=30",
        "wandb.enabled=false",
        on_log=term_once_sampling,
        state_exit=("FAILED", "143:0"),
    )
    assert sent and "got TERM: stopping the pool" in text and "stopped by signal 15" in text, text[-4000:]
    assert "eval pool exited with 143" in text and "Ray stopped; exit 143" in text
    assert not list(run.glob("eval/*/step_*/result.json"))  # stopped before any checkpoint finished
    _check_private_ray_gone(job, text, watch, base)
    assert _shared_gcs_pid() == shared_gcs


def test_the_scripts_ray_sweep_stops_exactly_one_ray_on_its_own(ray_cluster, tmp_path):
    """The script's last line of defence, without SLURM's process tracking: a Ray head started by hand
    with a private temp dir and ports is stopped entirely (orphaned agents included) by RAY_STOP_PY,
    and the shared Ray beside it keeps running."""
    text = SBATCH.read_text()
    code = text.split("export RAY_STOP_PY='", 1)[1].split("\n'\n", 1)[0]
    shared_gcs = _shared_gcs_pid()
    base = next(b for b in range(31000, 32600, 200) if all(_port_free(p) for p in range(b, b + 11)))
    temp = f"/tmp/ray_t{os.getpid()}"
    env = _env(tmp_path)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        AUTOSCALER_METRIC_PORT=str(base + 9),
        DASHBOARD_METRIC_PORT=str(base + 10),
    )
    ray = str(Path(sys.executable).parent / "ray")
    r = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={base}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={base + 1}",
            f"--ray-client-server-port={base + 2}",
            f"--dashboard-agent-listen-port={base + 3}",
            f"--dashboard-agent-grpc-port={base + 4}",
            f"--metrics-export-port={base + 5}",
            f"--node-manager-port={base + 6}",
            f"--object-manager-port={base + 7}",
            f"--runtime-env-agent-port={base + 8}",
            f"--min-worker-port={base + 20}",
            f"--max-worker-port={base + 199}",
            f"--temp-dir={temp}",
            "--num-cpus=1",
            f"--object-store-memory={100 * 1024 * 1024}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    watch = JobRay(temp, f"127.0.0.1:{base}")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.time() + 30
        while time.time() < deadline and not {"raylet", "ray::DashboardAgent"} <= set(watch.ports.values()):
            watch.scan()
            time.sleep(0.3)
        assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= set(watch.ports.values()), watch.ports
        assert all(base <= p < base + 200 for p in watch.ports), watch.ports
        out = subprocess.run(
            [sys.executable, "-c", code, temp, f"127.0.0.1:{base}", "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert not watch.alive(), (watch.alive(), out.stdout)
        assert _shared_gcs_pid() == shared_gcs
    finally:
        for line in watch.alive():  # only if the sweep failed: never leave this test's Ray behind
            os.kill(int(line.split()[0]), 9)
        subprocess.run(["rm", "-rf", temp], timeout=30)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False
