"""The eval pool's coordinator: what to compute, in which order, and what to do when a shard fails.

It is independent of Ray: an `Executor` runs shard tasks somewhere (Ray actors in
`ray_jobs/eval_pool.py`, or `LocalExecutor` in this process) and reports outcomes. State lives on
disk (partials, results), so a coordinator can be killed at any point and a new one continues:
finished shards are not redone, a result is written once per checkpoint, W&B logging catches up.

Order: real-data reference statistics first (every checkpoint needs them), then the newest
checkpoint without a result; a worker is preferably given a shard of the weights it already holds.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vldm.checkpoint import RUN_CONFIG, checkpoint_step, complete_checkpoints
from vldm.config import Config, build_config
from vldm.config.core import dump_yaml
from vldm.config.eval import EvalSuite
from vldm.eval.layout import RESULT, SHARDS, VIDEOS, default_reference_cache, step_dir, suite_dir
from vldm.eval.results import finalize_checkpoint, finalize_reference, load_reference, write_error
from vldm.eval.suite import prompts, protocol, protocol_hash, resolve
from vldm.eval.tasks import ShardTask, checkpoint_tasks, partial_done, reference_key, reference_tasks
from vldm.eval.wandb_log import NullLogger
from vldm.io import atomic_write_text


@dataclass
class Outcome:
    task: ShardTask
    ok: bool
    lost: bool = False  # the worker died (killed, OOM, node gone): retried like a failure
    error: str = ""
    summary: dict | None = None


class Executor(Protocol):
    def idle_slots(self) -> list[tuple[int, str]]: ...  # (slot id, weights key the slot holds)
    def submit(self, slot: int, task: ShardTask) -> None: ...
    def wait(self, timeout: float | None) -> list[Outcome]: ...
    def busy(self) -> int: ...
    def close(self) -> None: ...


class LocalExecutor:
    """One worker in this process, tasks run inside `wait` (no Ray): debugging and coordination tests."""

    def __init__(self, make_worker: Callable[[], object]):
        self._make = make_worker
        self._worker = None
        self._held = ""
        self._task: ShardTask | None = None

    def idle_slots(self) -> list[tuple[int, str]]:
        return [] if self._task else [(0, self._held)]

    def submit(self, slot: int, task: ShardTask) -> None:
        self._task = task

    def busy(self) -> int:
        return int(self._task is not None)

    def wait(self, timeout: float | None) -> list[Outcome]:
        if self._task is None:
            if timeout:
                time.sleep(timeout)
            return []
        task, self._task = self._task, None
        try:
            self._worker = self._worker or self._make()
            summary = self._worker.run(task)
            self._held = task.weights_key
            return [Outcome(task, True, summary=summary)]
        except Exception:  # noqa: BLE001 - reported to the coordinator, which retries or gives up
            return [Outcome(task, False, error=traceback.format_exc())]

    def close(self) -> None:
        self._worker = None


@dataclass
class _Job:
    """Open work on one checkpoint, or on one metric's reference statistics."""

    name: str
    tasks: list[ShardTask]
    remaining: set[str]
    ckpt: Path | None = None
    step: int = -1
    failed: str = ""
    needs: tuple[str, ...] = field(default=())


class Coordinator:
    def __init__(self, run_dir: str | Path, suite: EvalSuite, logger=None, log: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir).resolve()
        if not (self.run_dir / RUN_CONFIG).exists():
            raise FileNotFoundError(f"{self.run_dir / RUN_CONFIG} not found: is {self.run_dir} a run directory?")
        self.suite = suite
        self.protocol = protocol(suite)  # hashes weight files once; refuses a pinned sha256 that differs
        self.suite_hash = protocol_hash(self.protocol)
        self.run_cfg = build_config(Config, [str(self.run_dir / RUN_CONFIG)])
        if self.run_cfg.stage != "temporal":
            raise ValueError(
                f"{self.run_dir} is a stage={self.run_cfg.stage} run: the eval pool evaluates video "
                "(stage=temporal) checkpoints"
            )
        self.resolved = resolve(suite, self.run_cfg)
        self.prompts = prompts(suite)
        self.cache_dir = (
            Path(suite.pool.reference_cache).expanduser() if suite.pool.reference_cache else default_reference_cache()
        )
        self.logger = logger or NullLogger()
        self.log = log or (lambda m: print(f"[eval] {m}", flush=True))
        self.dir = suite_dir(self.run_dir, self.suite_hash)
        self.jobs: dict[str, _Job] = {}
        self.refs: dict[str, _Job] = {}
        self.ref_stats: dict[str, tuple] = {}
        self.inflight: dict[str, ShardTask] = {}
        self.attempts: Counter = Counter()
        self.finished: list[int] = []  # steps finalised by this coordinator
        self.failed: dict[str, str] = {}  # checkpoint name -> error (not retried by this process)

    # ------------------------------------------------------------------ bookkeeping on disk
    def write_suite_files(self) -> None:
        """suite.yaml (as given, incl. pool/W&B settings) and protocol.json (what the hash covers)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, text in (
            ("suite.yaml", dump_yaml(self.suite)),
            ("protocol.json", json.dumps(self.protocol, indent=2, sort_keys=True)),
        ):
            path = self.dir / name
            if not path.exists() or path.read_text() != text:  # a rerun leaves the run dir untouched
                atomic_write_text(path, text)

    def _marker(self, ckpt_name: str) -> Path:
        return step_dir(self.run_dir, self.suite_hash, ckpt_name) / f".wandb-{self.logger.run_id}"

    def catch_up_logging(self) -> None:
        """Log results that exist but never reached W&B (a coordinator killed right after writing them)."""
        if not self.logger.enabled:
            return
        for f in sorted(self.dir.glob(f"step_*/{RESULT}")):
            if not self._marker(f.parent.name).exists():
                self._log_result(json.loads(f.read_text()))

    def _log_result(self, result: dict) -> None:
        if self.logger.enabled:
            self.logger.log_result(result, self.run_dir)
            marker = self._marker(Path(result["checkpoint"]).name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

    # ------------------------------------------------------------------ planning
    def _needs(self) -> tuple[str, ...]:
        return tuple(m for m in ("fvd", "fid") if getattr(self.suite, m).enabled)

    def scan(self) -> int:
        """Plan work for new checkpoints (and missing reference statistics). Returns the number of new jobs."""
        new = 0
        for metric in self._needs():
            if metric in self.refs or metric in self.ref_stats:
                continue
            key = reference_key(self.suite, self.protocol, metric)
            cached = load_reference(self.cache_dir, key)
            if cached is not None:
                self.ref_stats[metric] = cached
                self.log(f"reference {metric}: cached {key} (N_real={cached[0].count})")
                continue
            from vldm.eval.videoio import list_videos

            n_real = len(list_videos(self.suite.real.videos, self.suite.real.num_videos))
            tasks = reference_tasks(self.suite, metric, self.cache_dir, key, n_real)
            self.refs[metric] = _Job(key, tasks, {t.name for t in tasks if not partial_done(t)})
            new += 1
        for ckpt in complete_checkpoints(self.run_dir):
            name = ckpt.name
            if name in self.jobs or name in self.failed:
                continue
            if (step_dir(self.run_dir, self.suite_hash, name) / RESULT).exists():
                continue
            step = checkpoint_step(ckpt)
            try:
                tasks = checkpoint_tasks(self.run_dir, self.suite, self.suite_hash, ckpt, step)
            except FileNotFoundError as e:
                self._fail(name, step, "plan", str(e), 0)
                continue
            self._remove_stale_temp_files(name)
            self.jobs[name] = _Job(
                name, tasks, {t.name for t in tasks if not partial_done(t)}, ckpt, step, needs=self._needs()
            )
            new += 1
            done = len(tasks) - len(self.jobs[name].remaining)
            self.log(f"{name}: {len(tasks)} shards planned" + (f" ({done} already done)" if done else ""))
        return new

    def _remove_stale_temp_files(self, ckpt_name: str) -> None:
        """Half-written files of a worker killed mid-write. Safe before any shard of this checkpoint is
        dispatched and once none runs any more: the suite lock excludes other coordinators, and only ours
        start workers on it."""
        sdir = step_dir(self.run_dir, self.suite_hash, ckpt_name)
        for pattern in (f"{SHARDS}/.*.tmp", f"{VIDEOS}/*/.*.tmp.mp4", ".*.tmp", ".*.tmp.png"):
            for f in sdir.glob(pattern):
                f.unlink(missing_ok=True)

    def queue(self) -> list[ShardTask]:
        out = [
            t
            for job in (*self.refs.values(), *self.jobs.values())
            if not job.failed
            for t in job.tasks
            if t.name in job.remaining and t.name not in self.inflight
        ]
        return sorted(out, key=ShardTask.sort_key)

    def dispatch(self, ex: Executor) -> None:
        queue = self.queue()
        for slot, held in ex.idle_slots():
            if not queue:
                return
            head = queue[0]
            # same priority class (reference, or the same checkpoint): keep the weights the worker holds
            pick = next(
                (
                    t
                    for t in queue
                    if t.weights_key == held
                    and held
                    and (t.kind == "reference") == (head.kind == "reference")
                    and t.step == head.step
                ),
                head,
            )
            queue.remove(pick)
            self.inflight[pick.name] = pick
            ex.submit(slot, pick)

    # ------------------------------------------------------------------ outcomes
    def _job_of(self, task: ShardTask) -> _Job | None:
        return self.refs.get(task.metric) if task.kind == "reference" else self.jobs.get(task.key)

    def _fail(self, name: str, step: int, task: str, error: str, attempts: int) -> None:
        self.failed[name] = error
        write_error(self.run_dir, self.suite_hash, name, step, task, error, attempts)
        self.log(
            f"{name}: FAILED ({task}, {attempts} attempts): {error.strip().splitlines()[-1] if error.strip() else ''}"
        )

    def handle(self, out: Outcome) -> None:
        t = out.task
        self.inflight.pop(t.name, None)
        job = self._job_of(t)
        if job is None:
            return
        if out.ok:
            job.remaining.discard(t.name)
            self.log(f"{t.name} done ({(out.summary or {}).get('wall_s', 0):.1f}s)")
            return
        self.attempts[t.name] += 1
        n = self.attempts[t.name]
        why = "worker lost" if out.lost else "error"
        self.log(
            f"{t.name}: {why} (attempt {n}/{self.suite.pool.max_attempts})"
            + (f": {out.error.strip().splitlines()[-1]}" if out.error.strip() else "")
        )
        if n >= self.suite.pool.max_attempts:
            job.failed = out.error or why
            if t.kind == "reference":
                for j in self.jobs.values():
                    if t.metric in j.needs and not j.failed:
                        j.failed = f"reference statistics for {t.metric} failed: {job.failed}"
                        self._fail(j.name, j.step, t.name, j.failed, n)
            else:
                self._fail(job.name, job.step, t.name, job.failed, n)

    def finalize_ready(self) -> None:
        for metric, job in list(self.refs.items()):
            if not job.failed and not job.remaining and not any(t.name in self.inflight for t in job.tasks):
                try:
                    self.ref_stats[metric] = finalize_reference(self.cache_dir, job.name, job.tasks)
                except Exception as e:  # noqa: BLE001 - e.g. no readable real video: fails the checkpoints, not the pool
                    job.failed = f"reference statistics for {metric}: {e}"
                    self.log(job.failed)
                    continue
                self.log(f"reference {metric}: {job.name} written (N_real={self.ref_stats[metric][0].count})")
                for f in (self.cache_dir / job.name / SHARDS).glob(".*.tmp"):  # left by a killed attempt
                    f.unlink(missing_ok=True)
                del self.refs[metric]
        for name, job in list(self.jobs.items()):
            if job.failed:
                del self.jobs[name]
                continue
            bad_ref = next((m for m in job.needs if m in self.refs and self.refs[m].failed), None)
            if bad_ref:
                self._fail(name, job.step, f"reference {bad_ref}", self.refs[bad_ref].failed, 0)
                del self.jobs[name]
                continue
            if job.remaining or any(t.name in self.inflight for t in job.tasks):
                continue
            if any(m not in self.ref_stats for m in job.needs):
                continue  # reference statistics still being computed
            try:
                result = finalize_checkpoint(
                    self.run_dir,
                    self.suite,
                    self.suite_hash,
                    self.protocol,
                    self.resolved,
                    job.ckpt,
                    job.step,
                    job.tasks,
                    self.ref_stats,
                    self.prompts,
                )
            except Exception:  # noqa: BLE001 - e.g. a partial deleted under us: record, do not crash the pool
                self._fail(name, job.step, "merge", traceback.format_exc(), 1)
                del self.jobs[name]
                continue
            del self.jobs[name]
            # none of its shards runs any more: whatever a killed attempt left half-written goes now
            self._remove_stale_temp_files(name)
            self.finished.append(job.step)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result["metrics"].items()) if "_t" not in k)
            self.log(f"{name}: result written ({shown})")
            self._log_result(result)

    # ------------------------------------------------------------------ main loop
    def run(self, ex: Executor, once: bool = False) -> int:
        """Evaluate until nothing is pending (once) or forever / until idle_exit_s. Returns #failed checkpoints."""
        pool = self.suite.pool
        self.write_suite_files()
        self.catch_up_logging()
        self.scan()
        last_scan = last_work = time.time()
        while True:
            self.finalize_ready()
            self.dispatch(ex)
            if not ex.busy():
                # nothing running and nothing dispatchable: look for new checkpoints before stopping
                if self.scan():
                    last_work = time.time()
                    continue
                if once:
                    break
                if pool.idle_exit_s and time.time() - last_work > pool.idle_exit_s:
                    self.log(f"no new checkpoint for {pool.idle_exit_s:.0f}s: exiting")
                    break
                time.sleep(pool.poll_interval_s)
                last_scan = time.time()
                continue
            for out in ex.wait(timeout=pool.poll_interval_s):
                self.handle(out)
                last_work = time.time()
            if not once and time.time() - last_scan > pool.poll_interval_s:
                # newer checkpoints take precedence over older queued work
                self.scan()
                last_scan = time.time()
        self.finalize_ready()
        return len(self.failed)
