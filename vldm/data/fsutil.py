"""The output-directory lock of the sharder (atomic writes: `vldm.io`)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class DirLocked(RuntimeError):
    """Another process holds the directory's lock."""


class DirLock:
    """An exclusive flock on DIR/.lock: one sharding run per output directory. The kernel drops it when
    the holder dies, even by kill -9, so a crashed run never blocks the rerun."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self._f: IO[str] | None = None

    def acquire(self) -> None:
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip()
            self._f.close()
            self._f = None
            raise DirLocked(
                f"another sharding run holds {self.path} ({holder or 'unknown'}); wait for it or stop it"
            ) from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
