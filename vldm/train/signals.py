"""Preemption: a signal only sets a flag; the ranks agree on it, save at the same step, and exit 75.

SLURM delivers `--signal=B:USR1@<grace>` to the batch shell, which forwards it to the srun step (see
slurm/train_temporal.sbatch); srun forwards it to every task. SIGTERM (time limit, scancel, preemption)
and SIGINT (Ctrl-C on a workstation) are handled the same way. A handler never does work itself: the
training loop reads the flag once per step and all-reduces it (MAX) with the step's loss, so even a
rank that did not get the signal stops at the same step, every rank writes its part of the checkpoint,
and the job exits with REQUEUE_EXIT, which the sbatch script turns into `scontrol requeue`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from vldm.io import atomic_write_text

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"; the sbatch script requeues on it
ABORT_EXIT = 3  # too many consecutive non-finite steps: requeueing would not help
CONFIG_EXIT = 2  # bad config (argparse uses 2 as well)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STATUS_FILE = "logs/last_exit.json"  # under run_dir; written by rank 0 as the last thing it does


def write_exit_status(run_dir: str | os.PathLike, code: int, step: int, max_steps: int, **extra: object) -> None:
    """RUN/logs/last_exit.json, rank 0's last act: what the sbatch script reads to requeue or not."""
    status = {
        "code": code,
        "step": step,
        "max_steps": max_steps,
        **extra,
        "status": {0: "done", REQUEUE_EXIT: "stopped", ABORT_EXIT: "aborted"}.get(code, "error"),
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "time": time.time(),
    }
    atomic_write_text(Path(run_dir) / EXIT_STATUS_FILE, json.dumps(status) + "\n")


def process_exit_code(code: int, launcher: str) -> int:
    """The exit code of a rank. Under srun a stop exits 0: `srun --kill-on-bad-exit=1` would kill the
    peers of the first rank to exit 75 while they finish (srun then reports 143, not 75), so the sbatch
    script reads the stop from RUN/logs/last_exit.json instead. Elsewhere the code itself says it."""
    return 0 if code == REQUEUE_EXIT and launcher == "slurm" else code


_EARLY: list[str] = []  # stop signals received before the StopRequest existed (install_early)


def install_early() -> None:
    """At process start (vldm.train.__main__), before the slow imports of torch, DeepSpeed and the model:
    a stop signal in those first seconds or minutes is remembered instead of killing the rank with the
    default action (USR1's ends the process); the StopRequest created later picks it up."""

    def remember(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        _EARLY.append(signal.Signals(signum).name)

    for s in STOP_SIGNALS:
        signal.signal(s, remember)


class StopRequest:
    """Set by USR1/TERM/INT, or by the job's own step / wall-time budget."""

    def __init__(self, stop_after_steps: int = 0, stop_after_minutes: float = 0.0, install: bool = True):
        self.signal_name: str | None = _EARLY[-1] if install and _EARLY else None
        self.stop_after_steps = stop_after_steps
        self.deadline = time.monotonic() + stop_after_minutes * 60 if stop_after_minutes > 0 else None
        self._previous: dict[int, object] = {}
        if install:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signal_name = signal.Signals(signum).name

    def local(self, steps_this_job: int) -> bool:
        """This rank's view; the loop all-reduces it so every rank stops at the same step."""
        if self.signal_name is not None:
            return True
        if self.stop_after_steps and steps_this_job >= self.stop_after_steps:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def reason(self, steps_this_job: int) -> str:
        if self.signal_name:
            return f"signal {self.signal_name}"
        if self.stop_after_steps and steps_this_job >= self.stop_after_steps:
            return f"train.stop_after_steps={self.stop_after_steps}"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "train.stop_after_minutes"
        return "another rank was signalled"

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
