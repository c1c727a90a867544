"""Where evaluation writes, inside the run directory (readers: the pool, `report`, W&B catch-up).

RUN/eval/<suite_hash>/
  suite.yaml  protocol.json        the suite as given, and the hashed protocol
  .lock                            held (flock) by the one coordinator working on this suite
  step_<N:08d>/                    one per checkpoint (same name as the checkpoint directory)
    result.json                    the result, written once, atomically (temp + rename)
    error.json                     why the last attempt failed (removed on success)
    shards/<variant>_<kind>_<start>-<stop>.npz    per-shard partial statistics (atomic)
    videos/<variant>/<index:06d>.mp4               the samples
    .wandb-<id>                    marker: this result was logged to W&B run <id>
<reference_cache>/<ref_hash>/stats.npz, meta.json, shards/   real-data statistics
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from vldm.checkpoint import TEMPORAL_EMA_WEIGHTS, TEMPORAL_WEIGHTS

EVAL_DIR = "eval"
RESULT = "result.json"
ERROR = "error.json"
SHARDS = "shards"
VIDEOS = "videos"
VARIANT_FILES = {"raw": TEMPORAL_WEIGHTS, "ema": TEMPORAL_EMA_WEIGHTS}


def suite_dir(run_dir: str | Path, suite_hash: str) -> Path:
    return Path(run_dir) / EVAL_DIR / suite_hash


def step_dir(run_dir: str | Path, suite_hash: str, ckpt_name: str) -> Path:
    return suite_dir(run_dir, suite_hash) / ckpt_name


def default_reference_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vldm" / "eval_reference"


def weights_fingerprint(ckpt_dir: str | Path, variant: str) -> list[int]:
    """(size, mtime_ns) of a checkpoint's weights file: partial results of an overwritten checkpoint
    are recognised as stale without hashing gigabytes on every scan."""
    st = (Path(ckpt_dir) / VARIANT_FILES[variant]).stat()
    return [st.st_size, st.st_mtime_ns]


class SuiteBusy(RuntimeError):
    """Another coordinator holds this suite's lock for this run."""


class SuiteLock:
    """An exclusive flock on `RUN/eval/<hash>/.lock`: one coordinator per (run, suite), so a checkpoint
    is never evaluated twice at once. The kernel drops the lock when its process dies, so a killed
    coordinator never leaves a stale lock behind."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> SuiteLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip()
            os.close(fd)
            raise SuiteBusy(
                f"another eval pool is working on {self.path.parent} ({holder or 'unknown holder'})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
