"""Process helpers of the demo: run a command with its output in a log file and progress on the console,
and measure the peak memory of everything the demo starts."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import deque
from pathlib import Path


class StageFailed(RuntimeError):
    """A stage's command failed; the message names its log file and ends with the log's last lines."""


def run_logged(
    cmd: list[str],
    log: Path,
    show: str | None = None,
    env: dict | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    prefix: str = "    ",
) -> str:
    """Run `cmd`, appending all its output to `log`; echo lines matching the regex `show` to the console.

    Returns the whole output. Raises StageFailed (with the log's tail) on a non-zero exit or timeout.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(show) if show else None
    tail: deque[str] = deque(maxlen=40)
    out: list[str] = []
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            bufsize=1,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                out.append(line)
                tail.append(line)
                if pattern and pattern.search(line):
                    print(prefix + line.rstrip(), flush=True)
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
    if rc != 0:
        raise StageFailed(f"{cmd[0]} ... exited with {rc}; log: {log}\n" + "".join(tail))
    return "".join(out)


class PeakMemory:
    """Samples, every `interval` s, the summed RSS of this process, its descendants and any extra processes
    a predicate selects (the Ray daemons when the demo started Ray: they are not our children).

    RSS double-counts shared pages (torch's libraries in every rank), so this is an upper bound.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_bytes = 0
        self.extra_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add_ray(self) -> None:
        """Count the local Ray daemons and workers too (call after the demo has started Ray itself)."""
        try:
            import psutil
        except ImportError:
            return
        for p in psutil.process_iter(["cmdline", "name"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray" in (p.info["name"] or "") or "/ray/" in cmd or cmd.startswith("ray::"):
                    self.extra_pids.add(p.pid)
            except (psutil.Error, TypeError):
                continue

    def sample(self) -> int:
        try:
            import psutil
        except ImportError:
            return 0
        total, seen = 0, set()
        try:
            me = psutil.Process(os.getpid())
            procs = [me] + me.children(recursive=True)
        except psutil.Error:
            return 0
        for pid in list(self.extra_pids):
            try:
                extra = psutil.Process(pid)
                procs += [extra] + extra.children(recursive=True)
            except psutil.Error:
                self.extra_pids.discard(pid)
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def wait_for_file(path: Path, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        time.sleep(0.2)
    return False
