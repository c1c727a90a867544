"""Metrics out: W&B on rank 0 (online, offline or disabled) and a JSON-lines file beside the checkpoints.

The loop calls `logger.log(metrics, step)` unconditionally; ranks other than 0, and runs with W&B
disabled, get loggers that do nothing, so the loop never asks "is logging on?".

W&B: the run id is derived from the absolute run_dir (or `wandb.id`), and `resume="allow"`, so a
requeued or restarted job continues the same run; every metric is plotted against
`trainer/global_step` (define_metric), which stays correct when a resumed job logs again from the
checkpoint's step. A W&B failure mid-run (its service dead or hung, a call failing or not returning) never
stops training: the job goes on in a fresh offline W&B run under the same run id (docs/failure-behaviour.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from vldm.config.core import to_dict
from vldm.config.schema import Config

STEP_METRIC = "trainer/global_step"
METRICS_FILE = "logs/metrics.jsonl"


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def preempting(self) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullLogger:
    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def preempting(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def run_id_for(cfg: Config) -> str:
    """Stable across requeues and restarts of the same run directory."""
    if cfg.wandb.id:
        return cfg.wandb.id
    return "vldm-" + hashlib.sha1(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]


class WandbLogger:
    """Rank 0's W&B run. Every W&B call is bounded (`_call`); when one fails or hangs mid-run, the job goes on
    in a fresh OFFLINE run under the same run id (`_fail_over`), once; if that fails too, W&B is off."""

    def __init__(self, cfg: Config, resolved: dict):
        name = Path(cfg.run_dir).resolve().name
        self.run_id = run_id_for(cfg)
        self.mode = cfg.wandb.mode
        self.init_timeout_s = cfg.wandb.init_timeout_s
        self.call_timeout_s, self.finish_timeout_s = cfg.wandb.call_timeout_s, cfg.wandb.finish_timeout_s
        self.broken = False  # W&B is off for the rest of this job
        self.fell_back = False  # the one mid-run switch to a fresh offline run has been made
        # the rows handed to the current W&B run that its service may not have written yet: after a failure the
        # run file says how many it wrote (a prefix: the service writes records in order), the rest is re-logged
        self.replay: deque[dict] = deque(maxlen=cfg.wandb.replay_rows)
        self.sent = 0  # rows handed to the current run
        self.files: list[str] = []  # this job's W&B run files (.wandb), in order: what `wandb sync` uploads
        self.kwargs = dict(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            group=cfg.wandb.group or name,
            name=cfg.wandb.name or name,
            id=self.run_id,
            resume="allow",
            config=resolved,
            tags=list(cfg.wandb.tags),
            job_type="train",
            # W&B files go beside the run unless WANDB_DIR says otherwise
            dir=os.environ.get("WANDB_DIR") or str(Path(cfg.run_dir)),
        )
        try:
            self.run = self._init(cfg.wandb.mode, cfg.wandb.init_timeout_s, self.kwargs)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, the run must not die of its server
            if cfg.wandb.mode != "online":
                raise
            # the server is a convenience, not part of the critical path: the offline files hold the same
            # history and `wandb sync` uploads them later under the same run id
            warnings.warn(
                f"W&B: could not reach the server within wandb.init_timeout_s={cfg.wandb.init_timeout_s:g} s "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); logging to OFFLINE files "
                f"instead (run id {self.run_id}); upload them later with `wandb sync`",
                RuntimeWarning,
                stacklevel=2,
            )
            self.mode = "offline"
            import wandb

            wandb.teardown()  # the failed online attempt still holds the run id in W&B's service process
            self.run = self._init("offline", cfg.wandb.init_timeout_s, self.kwargs)
        self._started(self.run)
        self.started_at = time.time()

    @staticmethod
    def _init(mode: str, timeout_s: float, kwargs: dict):
        import wandb

        # init_timeout bounds the wait for the server (W&B's default is 90 s, and it retried for ~120 s here)
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout_s), **kwargs)

    def _started(self, run) -> None:
        run.define_metric(STEP_METRIC)
        for prefix in ("train/*", "perf/*", "ckpt/*", "data/*"):
            run.define_metric(prefix, step_metric=STEP_METRIC)
        self.files.append(str(run.settings.sync_file))

    def _call(self, timeout_s: float, fn, *args, **kwargs) -> str | None:
        """Run one W&B call in a daemon thread, waiting at most timeout_s; None if it returned, else why not.
        The SDK talks to its service process (wandb-core) over a socket: if that process died, calls raise; if
        it is stopped or wedged, they (and wandb.finish, which waits for the upload) block without bound."""
        error: list[BaseException] = []

        def call() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
                error.append(e)

        t = threading.Thread(target=call, name="wandb-call", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            return f"did not return within {timeout_s:g} s"
        if error:
            text = str(error[0]).splitlines()
            return f"failed ({type(error[0]).__name__}{': ' + text[0] if text else ''})"
        return None

    def _drop_service(self) -> None:
        """End OUR W&B service process (this process's wandb-core child) and the SDK's connection to it, so that
        its run file is final (it can be read) and the next wandb.init starts a fresh service. First W&B's own
        teardown, bounded by wandb.call_timeout_s: a live service (one that only cannot upload) then flushes its
        run file and exits at once (measured: 0.0 s, with the upload still pending); the teardown also unregisters
        W&B's exit hook, which would otherwise talk to a dead service or wait for a stopped one forever. Whatever
        is still running after it (a stopped or wedged service) is SIGKILLed. Errors are expected: the socket
        may be gone."""
        import wandb

        t = threading.Thread(target=lambda: _quietly(wandb.teardown), name="wandb-teardown", daemon=True)
        t.start()
        t.join(self.call_timeout_s)
        kill_wandb_service()
        t.join(self.call_timeout_s)  # the teardown was waiting for that process: it returns now

    def _fail_over(self, what: str, why: str) -> None:
        """The current run's service failed: switch to a fresh offline run under the same run id and re-log
        there the rows the failed service had not written to its run file; if that also fails, W&B is off."""
        self._drop_service()
        if self.fell_back:
            self._off(f"W&B: {what} {why} in the offline fallback run too")
            return
        self.fell_back = True
        try:
            written = count_rows(self.files[-1])
        except Exception as e:  # noqa: BLE001 - an unreadable file: re-log what is kept rather than lose it
            warnings.warn(f"W&B: cannot read {self.files[-1]} ({e}); re-logging the kept rows", RuntimeWarning, 3)
            written = 0
        not_kept = self.sent - len(self.replay)  # rows too old to re-log (beyond wandb.replay_rows)
        redo = list(self.replay)[max(0, written - not_kept) :]
        gap = f"; {not_kept - written} older rows are only in {METRICS_FILE}" if written < not_kept else ""
        if what == "finish" and not redo:
            # every row is in the run's file (an unreachable server: the service wrote the file and kept retrying
            # the upload); nothing to go on with: the file is for `wandb sync`
            self.broken = True
            warnings.warn(
                f"W&B: finish {why}; all {written} rows of this job are in its run file {self.files[-1]} (run id "
                f"{self.run_id}); W&B's service was stopped. Upload later with `{self.sync_command()}`",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if written == 0:
            self.files.pop()  # the failed service flushed no row to its file: nothing in it to upload
        # W&B names a run's directory by the second it started and the run id: a fallback started within the
        # same second as the failed run would write into the failed run's file
        time.sleep(max(0.0, 1.1 - (time.time() - self.started_at)))
        box: list = []
        failed = self._call(
            self.init_timeout_s, lambda: box.append(self._init("offline", self.init_timeout_s, self.kwargs))
        )
        if failed is None:
            failed = self._call(self.call_timeout_s, self._started, box[0])
        if failed is not None:
            self._drop_service()
            self._off(f"W&B: {what} {why}; the offline fallback run {failed} too")
            return
        self.run, self.mode = box[0], "offline"
        self.replay.clear()
        self.sent = 0
        warnings.warn(
            f"W&B: {what} {why}; the job goes on in a fresh OFFLINE run under the same run id {self.run_id} "
            f"({written} rows were in the failed run's file, {len(redo)} re-logged{gap}). Upload later with "
            f"`{self.sync_command()}`",
            RuntimeWarning,
            stacklevel=3,
        )
        for row in redo:
            self._log_row(row)

    def sync_command(self) -> str:
        """The `wandb sync` of this job's run files. The files of one run id are uploaded one after the other in
        the order they were started (wandb 0.31's `wandb sync`), so the fallback run continues the failed one;
        an online run's file needs --include-online (its upload may have stopped part-way)."""
        dirs = [str(Path(f).parent) for f in self.files]
        online = any(Path(d).name.startswith("run-") for d in dirs)
        return "wandb sync " + ("--include-online " if online else "") + " ".join(dirs)

    def _off(self, message: str) -> None:
        self.broken = True
        warnings.warn(
            f"{message}; W&B is OFF for the rest of this job (run id {self.run_id}). Every step is still in "
            f"{METRICS_FILE} of the run dir; what W&B wrote before is in its local run files (`wandb sync`)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _bounded(self, what: str, timeout_s: float, fn, *args, **kwargs) -> bool:
        if self.broken:
            return False
        why = self._call(timeout_s, fn, *args, **kwargs)
        if why is not None:
            self._fail_over(what, why)
        return why is None

    def _log_row(self, row: dict) -> None:
        if self.broken:
            return
        self.replay.append(row)
        self.sent += 1
        self._bounded("log", self.call_timeout_s, self.run.log, row)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._log_row({**metrics, STEP_METRIC: step})

    def preempting(self) -> None:
        # the W&B UI shows "preempted", not "crashed"; after a fail-over, the fallback run is the one to mark
        while not self.broken and not self._bounded("mark_preempting", self.call_timeout_s, self.run.mark_preempting):
            pass

    def finish(self, exit_code: int = 0) -> None:
        # a finish that fails over re-logs what the service had not written into the offline run: finish that one
        while not self.broken and not self._bounded(
            "finish", self.finish_timeout_s, self.run.finish, exit_code=exit_code
        ):
            pass


def count_rows(path: str | os.PathLike) -> int:
    """History rows in a W&B run file (0 if there is none): how many of the rows handed to its service it wrote."""
    from wandb.proto import wandb_internal_pb2 as pb

    from vldm.io import leveldb_log_records

    if not Path(path).is_file():
        return 0
    n = 0
    for blob in leveldb_log_records(path, b":W&B"):
        r = pb.Record()
        r.ParseFromString(blob)
        n += r.WhichOneof("record_type") == "history"
    return n


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the service is gone: its connection cannot close cleanly
        pass


def wandb_service_pids() -> list[int]:
    """The W&B service processes (wandb-core) started by this process: its children that run wandb-core."""
    pids = []
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            listed = children.read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for pid in listed:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"wandb-core" in cmd:
                pids.append(int(pid))
    return pids


def kill_wandb_service() -> None:
    for pid in wandb_service_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class JsonlLogger:
    """RUN/logs/metrics.jsonl: one line per logged step, with the SLURM job and restart count."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.job = {"job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        line = json.dumps({"step": step, **metrics, **self.job, "time": time.time()})
        # one write of a whole line: readers never see half a record
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def preempting(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class MultiLogger:
    def __init__(self, loggers: list):
        self.loggers = loggers
        self.run_id = next((getattr(lg, "run_id", None) for lg in loggers if getattr(lg, "run_id", None)), None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def preempting(self) -> None:
        for lg in self.loggers:
            lg.preempting()

    def finish(self, exit_code: int = 0) -> None:
        for lg in self.loggers:
            lg.finish(exit_code)


def build_logger(cfg: Config, is_main: bool) -> Logger:
    if not is_main:
        return NullLogger()
    loggers: list = []
    if cfg.wandb.mode != "disabled":
        loggers.append(WandbLogger(cfg, to_dict(cfg)))
    if cfg.train.metrics_file:
        loggers.append(JsonlLogger(cfg.run_dir))
    return MultiLogger(loggers) if loggers else NullLogger()
