"""Multi-node for real on one machine: two emulated hosts (network namespaces on a bridge, each with its
own address, ports and host name; tests/multihost.py, scripts/hosts_up.sh) and a SLURM cluster with one
slurmd per host. The production entry points run unchanged: `sbatch --nodes=2 slurm/train_temporal.sbatch`
trains with DeepSpeed ZeRO-2 over gloo across the two hosts (rendezvous at the first host's address),
survives USR1 -> checkpoint -> requeue -> resume, and follows the single-host trajectory exactly."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import multihost
import pytest
from multihost import scontrol_job, wait_job
from train_helpers import ROOT, SBATCH, TINY, TINY_RUN, describe, losses, metrics, run_local, train_env

multihost_slurm = multihost.multihost_slurm  # the fixture, used by this module
STEPS = 8
RUN = [*TINY_RUN, f"train.max_steps={STEPS}", "checkpoint.every=2", "data.batch_size=1", "wandb.mode=disabled"]
RUN += ["deepspeed.timeout_s=300"]  # generous: a loaded 2-core machine starts ranks minutes apart
SBATCH_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]


@pytest.fixture(scope="module")
def single_host_run(tmp_path_factory) -> Path:
    """The reference: the same 2 ranks x 1 clip on one host (local launcher, loopback rendezvous)."""
    run = tmp_path_factory.mktemp("single") / "run"
    proc = run_local(run, *RUN, nproc=2, timeout=900)
    assert proc.returncode == 0, describe(proc)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    return run


def sbatch(mh, tmp_path: Path, script: Path, *args: str, opts=SBATCH_OPTS) -> str:
    env = {**train_env(tmp_path), **{k: mh.env[k] for k in ("SLURM_CONF", "SLURM_ROOT", "PATH")}}
    out = subprocess.run(
        ["sbatch", "--parsable", *opts, f"--output={tmp_path}/slurm-%j.out", str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def test_multihost_training_requeues_across_hosts_and_matches_single_host(multihost_slurm, single_host_run, tmp_path):
    mh = multihost_slurm
    run = tmp_path / "run"
    job = sbatch(mh, tmp_path, SBATCH, str(TINY), f"run_dir={run}", *RUN)
    log = tmp_path / f"slurm-{job}.out"
    deadline = time.time() + 600
    while time.time() < deadline and not ((run / "logs" / "metrics.jsonl").exists() and losses(run)):
        assert scontrol_job(mh.env, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            log.read_text() if log.exists() else job
        )
        time.sleep(0.2)
    assert losses(run), log.read_text() if log.exists() else job
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=mh.env, check=True, timeout=30)
    assert wait_job(mh.env, job, 900) == "COMPLETED", log.read_text()[-5000:]
    text = log.read_text()
    assert scontrol_job(mh.env, job, "Restarts") == "1", text[-3000:]
    assert "got USR1" in text and "requeueing job" in text and "restart 1:" in text

    # the rendezvous is the first host by name, and that name is the host's address on the hosts' network
    master = mh.hosts[0]
    assert f"2 node(s) x 1 task(s) = 2 ranks, master {master}:" in text, text[-3000:]
    assert socket.gethostbyname(master) == mh.addrs[master] and not mh.addrs[master].startswith("127.")
    assert scontrol_job(mh.env, job, "NodeList") == f"{mh.hosts[0][:-1]}[0-1]"
    # both runs of the job started a rank on the second host (its own slurmd launched the step)
    h1 = mh.slurm_log(f"slurmd-{mh.hosts[1]}.log")
    assert f"launch task StepId={job}.0 " in h1, h1[-3000:]
    assert h1.count(f"launch task StepId={job}.0 ") == 2, h1[-3000:]

    final = json.loads((run / "logs" / "last_exit.json").read_text())
    assert final["status"] == "done" and final["step"] == STEPS and final["restart"] == 1
    rows = [m for m in metrics(run) if "train/loss" in m]
    by_job = {r: [m["step"] for m in rows if m["restart"] == r] for r in (0, 1)}
    assert by_job[0] and by_job[1] and by_job[0] + by_job[1] == list(range(1, STEPS + 1)), by_job
    assert f"resuming from {run}/checkpoints/step_{by_job[0][-1]:08d}" in text
    # gloo over the bridge sums the same numbers as over loopback: the trajectory is the single-host one
    assert {m["step"]: m["train/loss"] for m in rows} == losses(single_host_run)


# ------------------------------------------------------------------------------------------ eval pool
EVAL_SBATCH = ROOT / "slurm" / "eval_pool.sbatch"
EVAL_FAST = [
    "sampling.num_samples=4",
    "sampling.steps=2",
    "val_loss.num_clips=2",
    "val_loss.timesteps=[300,700]",
    "pool.shard_size=1",  # many small shards: both hosts' actors get some
    "pool.poll_interval_s=0.2",
    "wandb.enabled=false",
]


def eval_env(mh, tmp_path: Path) -> dict:
    env = {**train_env(tmp_path), **{k: mh.env[k] for k in ("SLURM_CONF", "SLURM_ROOT", "PATH")}}
    env.pop("RAY_ADDRESS", None)
    # no HEAD_IP, no loopback-only Ray: the script finds the head's address on the hosts' network itself
    env.pop("HEAD_IP", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env["RAY_OBJECT_STORE_BYTES"] = str(150 * 1024 * 1024)
    return env


def ray_procs_on(mh, i: int) -> list[str]:
    """Ray processes (ray start's raylet, gcs, agents, workers) left in host i's namespace."""
    out = []
    for pid in mh.netns_pids(i):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if stat != "Z" and any(k in cmd for k in ("/ray/", "ray::", "/bin/ray ", "raylet", "gcs_server")):
            out.append(f"{pid} {cmd[:160]}")
    return out


def run_eval(mh, tmp_path: Path, run: Path, on_log=None, timeout: float = 900) -> tuple[str, str]:
    opts = ["--nodes=2", "--ntasks-per-node=1", "--gres=none", "--cpus-per-task=1", "--time=30"]
    args = ["--run-dir", str(run), "--once", "--suite", "configs/eval/tiny.yaml", *EVAL_FAST]
    job = sbatch(mh, tmp_path, EVAL_SBATCH, *args, opts=opts)
    log = tmp_path / f"slurm-{job}.out"
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = scontrol_job(mh.env, job, "JobState")
        if on_log is not None and log.exists():
            on_log(job, log.read_text())
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.3)
    else:
        subprocess.run(["scancel", job], env=mh.env, timeout=30)
        raise TimeoutError(log.read_text()[-4000:] if log.exists() else job)
    text = log.read_text()
    assert (state, scontrol_job(mh.env, job, "ExitCode")) == ("COMPLETED", "0:0"), text[-5000:]
    return job, text


def shard_hosts(run: Path) -> set[str]:
    from vldm.eval.tasks import read_meta

    return {read_meta(p)["host"] for p in run.glob("eval/*/step_*/shards/*.npz")}


def test_multihost_eval_pool_spans_both_hosts_one_result_per_checkpoint(multihost_slurm, tmp_path):
    from eval_helpers import make_tiny_run

    mh = multihost_slurm
    run = make_tiny_run(tmp_path / "tiny")
    job, text = run_eval(mh, tmp_path, run)
    head = mh.hosts[0]
    # the head's address is its address on the hosts' network (not 127.x), found by the script itself
    assert f"head {head} ({mh.addrs[head]}:" in text, text[-3000:]
    assert "2/2 Ray node(s) up" in text and "2 checkpoint(s) evaluated, 0 failed" in text, text[-4000:]
    results = sorted(run.glob("eval/*/step_*/result.json"))
    assert [p.parent.name for p in results] == ["step_00000100", "step_00000200"]
    # the pool's actors ran on both hosts: each partial names the host that computed it
    assert shard_hosts(run) == set(mh.hosts), shard_hosts(run)
    assert "Ray stopped; exit 0" in text
    for i in range(len(mh.hosts)):
        assert not ray_procs_on(mh, i), (i, ray_procs_on(mh, i))


def test_multihost_eval_pool_survives_losing_the_worker_host_raylet(multihost_slurm, tmp_path):
    from eval_helpers import make_tiny_run

    mh = multihost_slurm
    run = make_tiny_run(tmp_path / "tiny")
    killed = []

    def kill_worker_raylet(job, text):
        if killed or "shards planned" not in text:
            return
        # the worker host's Ray node dies (its raylet and everything under it), mid-run
        for line in ray_procs_on(mh, 1):
            pid, cmd = line.split(" ", 1)
            if cmd.split(" ")[0].endswith("/raylet"):
                subprocess.run(["kill", "-9", pid], timeout=30)
                killed.append(pid)

    job, text = run_eval(mh, tmp_path, run, on_log=kill_worker_raylet)
    assert killed, text[-4000:]
    assert "2 checkpoint(s) evaluated, 0 failed" in text, text[-4000:]
    results = sorted(run.glob("eval/*/step_*/result.json"))
    assert [p.parent.name for p in results] == ["step_00000100", "step_00000200"]
    assert "Ray stopped; exit 0" in text
    for i in range(len(mh.hosts)):
        assert not ray_procs_on(mh, i), (i, ray_procs_on(mh, i))


# ------------------------------------------------------------------------------------------ Ray sharding
multihost_ray = multihost.multihost_ray  # the fixture


def test_multihost_ray_sharding_on_two_hosts_survives_losing_the_worker_host(multihost_slurm, multihost_ray, tmp_path):
    """`ray job submit ... data_prep/shard_videos.py` on a Ray cluster over both hosts: tasks run on both
    (Ray's state API), the worker host's raylet SIGKILLed mid-run: its tasks are redone on the head, every
    clip exactly once; a rerun is a no-op."""
    from ray.util.state import list_nodes, list_tasks
    from test_data_ray import check_consistent, shard_cmd

    from vldm.config.data import SyntheticConfig
    from vldm.data.synthetic import write_corpus

    mh, url = multihost_slurm, multihost_ray
    src, out = tmp_path / "in", tmp_path / "out"
    write_corpus(SyntheticConfig(output=str(src), count=12, size="64", frames=64, fps=8, seed=5))  # 8 clips each
    opts = ["--frames", "8", "--fps", "8", "--size", "128", "--videos-per-shard", "1", "--workers", "2"]
    env = {**train_env(tmp_path), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    submit = [ray, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--no-wait", "--"]
    sub = subprocess.run(
        [*submit, "python", "data_prep/shard_videos.py", str(src), str(out), *opts],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)

    def status() -> str:
        return str(client.get_job_status(job_id)).split(".")[-1]

    done = lambda: len(list(out.glob("*.done.json"))) if out.exists() else 0  # noqa: E731
    killed = []
    deadline = time.time() + 600
    st, next_status = "PENDING", 0.0
    while st in ("PENDING", "RUNNING"):
        assert time.time() < deadline, st
        if not killed:
            procs = multihost.host_ray_procs(mh, 1)
            busy = [p for p, cmd in procs if "ray::write_shard" in cmd]
            raylet = [p for p, cmd in procs if cmd.split(" ")[0].endswith("/raylet")]
            if busy and raylet:  # a shard task mid-way on the worker host: its node dies under it
                subprocess.run(["kill", "-9", *map(str, raylet)], timeout=30)
                killed.append(done())
        if time.time() >= next_status:
            st, next_status = status(), time.time() + 1.0
        time.sleep(0.05)
    logs = client.get_job_logs(job_id)
    assert st == "SUCCEEDED", logs[-4000:]
    assert killed and killed[0] < 12, (killed, logs[-3000:])

    # where the shard tasks ran: both hosts (the state API keeps the dead node's tasks too)
    ip_of = {n.node_id: n.node_ip for n in list_nodes(address=url, detail=True)}
    tasks = list_tasks(address=url, filters=[("func_or_class_name", "=", "write_shard")], detail=True, limit=1000)
    ran_on = {ip_of.get(t.node_id) for t in tasks if t.node_id}
    assert set(mh.addrs.values()) <= ran_on, (ran_on, [(t.state, t.node_id) for t in tasks])

    keys = check_consistent(out)
    assert len(keys) == len(set(keys)) == 12 * 8  # every clip exactly once
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["clips"] == 96 and stats["inputs"]["failed"] == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = subprocess.run(shard_cmd(str(src), str(out), *opts), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


# ------------------------------------------------------------------------------------------ node loss
def test_multihost_node_lost_mid_training_job_ends_and_resumes_on_the_remaining_host(multihost_slurm, tmp_path):
    """The second host dies (its slurmd, slurmstepd and rank, SIGKILL): the job ends within the watchdog
    time; resubmitted on the remaining host alone it resumes from the newest complete checkpoint at the
    other world size (fresh optimizer, said so) and finishes the run."""
    from vldm.checkpoint import complete_checkpoints

    mh = multihost_slurm
    run = tmp_path / "run"
    steps, watchdog = 16, 60
    args = [str(TINY), f"run_dir={run}", *RUN, f"train.max_steps={steps}", f"deepspeed.timeout_s={watchdog}"]
    try:
        job = sbatch(mh, tmp_path, SBATCH, *args)
        log = tmp_path / f"slurm-{job}.out"
        deadline = time.time() + 600
        while time.time() < deadline and not complete_checkpoints(run):
            assert scontrol_job(mh.env, job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
                log.read_text() if log.exists() else job
            )
            time.sleep(0.2)
        assert complete_checkpoints(run), log.read_text() if log.exists() else job
        victims = mh.netns_pids(1)
        assert victims
        t_lost = time.time()
        subprocess.run(["kill", "-9", *map(str, victims)], timeout=30)
        # the job's run ends (gloo sees the peer gone, slurmctld the node): SLURM then fails it, or requeues
        # it (--requeue) to wait for two nodes again
        deadline = time.time() + 600
        while (state := scontrol_job(mh.env, job, "JobState")) in ("RUNNING", "CONFIGURING", "COMPLETING"):
            assert time.time() < deadline, state
            time.sleep(0.2)
        lost_to_end = time.time() - t_lost
        subprocess.run(["scancel", job], env=mh.env, timeout=30)  # not back once the host is: resubmitted below
        text = log.read_text()
        assert state in ("PENDING", "REQUEUED", "FAILED", "NODE_FAIL", "CANCELLED"), (state, text[-4000:])
        assert "DUE TO NODE FAILURE" in text or "Node failure on" in text, text[-4000:]
        assert lost_to_end < watchdog + 120, (lost_to_end, text[-4000:])  # the watchdog bound, with slack for load
        print(f"node lost -> job {state} in {lost_to_end:.1f} s (watchdog {watchdog} s)")
        newest = complete_checkpoints(run)[-1]
        last = run / "logs" / "last_exit.json"  # rank 0 died of the lost peer: no clean exit recorded
        assert not last.exists() or json.loads(last.read_text()).get("status") != "done"

        # resubmitted on the host that is left: one rank, the other world size
        job2 = sbatch(mh, tmp_path, SBATCH, *args, opts=["--nodes=1", f"--nodelist={mh.hosts[0]}", *SBATCH_OPTS[1:]])
        assert wait_job(mh.env, job2, 600) == "COMPLETED", (tmp_path / f"slurm-{job2}.out").read_text()[-5000:]
        text2 = (tmp_path / f"slurm-{job2}.out").read_text()
        assert f"1 node(s) x 1 task(s) = 1 ranks, master {mh.hosts[0]}:" in text2
        assert f"resuming from {newest}" in text2, text2[-4000:]
        assert "FRESH optimizer state (saved at world size 2, now 1)" in text2, text2[-4000:]
        final = json.loads((run / "logs" / "last_exit.json").read_text())
        assert final["status"] == "done" and final["step"] == steps and str(final["job"]) == job2
        done = int(newest.name.split("_")[1])
        assert sorted(m["step"] for m in metrics(run) if "train/loss" in m and str(m.get("job")) == job2) == list(
            range(done + 1, steps + 1)
        )
    finally:
        mh.restore()  # the lost host's slurmd back, its node RESUMEd: later tests get two hosts again
