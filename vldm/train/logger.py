"""Metrics out: W&B on rank 0 (online, offline or disabled) and a JSON-lines file beside the checkpoints.

The loop calls `logger.log(metrics, step)` unconditionally; ranks other than 0, and runs with W&B
disabled, get loggers that do nothing, so the loop never asks "is logging on?".

W&B: the run id is derived from the absolute run_dir (or `wandb.id`), and `resume="allow"`, so a
requeued or restarted job continues the same run; every metric is plotted against
`trainer/global_step` (define_metric), which stays correct when a resumed job logs again from the
checkpoint's step.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
import warnings
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
    def __init__(self, cfg: Config, resolved: dict):
        name = Path(cfg.run_dir).resolve().name
        self.run_id = run_id_for(cfg)
        self.mode = cfg.wandb.mode
        self.call_timeout_s, self.finish_timeout_s = cfg.wandb.call_timeout_s, cfg.wandb.finish_timeout_s
        self.broken = False  # a call hung or failed: W&B is off for the rest of this job
        kwargs = dict(
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
            self.run = self._init(cfg.wandb.mode, cfg.wandb.init_timeout_s, kwargs)
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
            self.run = self._init("offline", cfg.wandb.init_timeout_s, kwargs)
        self.run.define_metric(STEP_METRIC)
        for prefix in ("train/*", "perf/*", "ckpt/*", "data/*"):
            self.run.define_metric(prefix, step_metric=STEP_METRIC)

    @staticmethod
    def _init(mode: str, timeout_s: float, kwargs: dict):
        import wandb

        # init_timeout bounds the wait for the server (W&B's default is 90 s, and it retried for ~120 s here)
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout_s), **kwargs)

    def _bounded(self, what: str, timeout_s: float, fn, *args, **kwargs) -> None:
        """Run one W&B call in a daemon thread, waiting at most timeout_s. The SDK talks to its service process
        (wandb-core) over a socket: if that process died, calls raise; if it is stopped or wedged, they (and
        wandb.finish, which waits for the upload) block without bound. Either way W&B is turned off for the
        rest of the job, once, and training goes on; metrics.jsonl keeps every step."""
        if self.broken:
            return
        error: list[BaseException] = []

        def call() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
                error.append(e)

        t = threading.Thread(target=call, name=f"wandb-{what}", daemon=True)
        t.start()
        t.join(timeout_s)
        if not t.is_alive() and not error:
            return
        self.broken = True
        why = f"did not return within {timeout_s:g} s" if t.is_alive() else f"failed ({type(error[0]).__name__})"
        warnings.warn(
            f"W&B: {what} {why}; W&B is OFF for the rest of this job (run id {self.run_id}). Every step is still in "
            f"{METRICS_FILE} of the run dir; what W&B wrote before is in its local run files (`wandb sync`)",
            RuntimeWarning,
            stacklevel=3,
        )
        if t.is_alive():
            # a wedged service would also block W&B's own exit hook (it waits for the process): end it now
            kill_wandb_service()
        # W&B's exit hook would otherwise talk to the dead service and print a traceback at exit: tear the
        # connection down now (it unregisters that hook first), bounded, its errors expected and ignored
        import wandb

        t = threading.Thread(target=lambda: _quietly(wandb.teardown), name="wandb-teardown", daemon=True)
        t.start()
        t.join(timeout_s)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._bounded("log", self.call_timeout_s, self.run.log, {**metrics, STEP_METRIC: step})

    def preempting(self) -> None:
        # the W&B UI shows "preempted", not "crashed"
        self._bounded("mark_preempting", self.call_timeout_s, self.run.mark_preempting)

    def finish(self, exit_code: int = 0) -> None:
        self._bounded("finish", self.finish_timeout_s, self.run.finish, exit_code=exit_code)


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
