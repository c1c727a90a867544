"""Shard lists for the loader: expand `DataConfig.shards`, find buckets and sample counts, open shards
as streams, and the retry policy for shards on flaky storage.

Accepted (several joined with '::'): a directory (its *.tar), a glob, a brace pattern
(`shard-{000000..000099}.tar`), an fsspec URL of any of these (`s3://bucket/shards/`,
`gs://b/shard-*.tar`, `file:///...`), or `pipe:COMMAND` writing a tar to stdout (the command runs in
a shell: it is part of your config, like WebDataset's pipe: URLs; a non-zero exit status is a read
error).

Bucketed sharder output (`--buckets`): OUTPUT/<HxWxF>/{prefix}-{shard:06d}.tar per bucket, and a top-level
OUTPUT/_shards.json = {"buckets": {"320x512x16": {"height", "width", "frames"}, ...}, "shards": [{"name":
"320x512x16/shard-000000.tar", "bucket", "samples", ...}]} (names relative to OUTPUT). `layout()` reads
it when `data.shards` is that one directory; each bucket directory is also a flat layout of its own.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TypeVar

from braceexpand import braceexpand

from vldm.data.format import INDEX_FILE, MANIFEST_SUFFIX, SHARD_SUFFIX
from vldm.data.tario import iter_samples

log = logging.getLogger("vldm.data")
_GLOB = set("*?[")
T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff for reads of shards and their indexes (DataConfig.read_retries,
    retry_backoff_s, retry_backoff_max_s): wait backoff_s, 2 x backoff_s, ... (at most max_backoff_s,
    with jitter in [0.5, 1] x so the workers of many ranks retrying one store do not stampede)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # a private generator: the process's `random` state is part of a checkpoint and must not move
    _rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg) -> Retry:
        return cls(cfg.read_retries, cfg.retry_backoff_s, cfg.retry_backoff_max_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (1, 2, ...)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + 0.5 * self._rng.random())

    def call(self, what: str, fn: Callable[[], T], fatal: tuple[type[BaseException], ...] = ()) -> T:
        """fn(), retried on any exception but `fatal` ones; the last failure is raised."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except fatal:
                raise
            except Exception as e:
                if attempt >= self.retries:
                    raise
                wait = self.delay(attempt + 1)
                log.warning(
                    "%s failed (%s: %s): retry %d/%d in %.1f s",
                    what,
                    type(e).__name__,
                    e,
                    attempt + 1,
                    self.retries,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")


NO_RETRY = Retry(0)


def _is_fsspec(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand(spec: str) -> list[str]:
    """`DataConfig.shards` -> shard URLs (each part sorted; parts in the order given, duplicates dropped)."""
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if part.startswith("pipe:"):
            urls.extend(braceexpand(part))
            continue
        found: list[str] = []
        if _is_fsspec(part):
            import fsspec

            fs, path = fsspec.core.url_to_fs(part)
            for p in braceexpand(path):
                if _GLOB & set(p):
                    found.extend(fs.glob(p))
                elif fs.isdir(p):
                    found.extend(f for f in fs.glob(p.rstrip("/") + "/*" + SHARD_SUFFIX))
                else:
                    found.append(p)
            found = [fs.unstrip_protocol(f) for f in sorted(found)]
        else:
            for p in braceexpand(_local(part)):
                if _GLOB & set(p):
                    found.extend(sorted(glob.glob(p)))
                elif os.path.isdir(p):
                    found.extend(sorted(glob.glob(os.path.join(p, "*" + SHARD_SUFFIX))))
                else:
                    found.append(p)
        if not found:
            raise FileNotFoundError(f"no shards match {part!r}")
        urls.extend(found)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


class _PipeStream(io.RawIOBase):
    """A pipe command's stdout that turns a non-zero exit status into a read error at end of data (a
    failed `aws s3 cp ... -` or `curl` often ends its output cleanly at a tar member boundary)."""

    def __init__(self, proc: subprocess.Popen, cmd: str):
        self.proc, self.cmd = proc, cmd

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)  # type: ignore[union-attr]
        if not n:
            rc = self.proc.wait(timeout=60)  # its stdout is closed: it is exiting
            if rc != 0:
                raise OSError(f"pipe command exited with status {rc}: {self.cmd}")
        return n


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A readable binary stream of the shard; closed (and a pipe's process reaped) on exit."""
    if url.startswith("pipe:"):
        cmd = url[len("pipe:") :]
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            yield io.BufferedReader(_PipeStream(proc, cmd), 1 << 20)  # type: ignore[misc]
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
            if proc.poll() is None:
                proc.kill()  # we may stop reading early (end of a segment)
            proc.wait()
    elif _is_fsspec(url):
        import fsspec

        with fsspec.open(url, "rb") as f:
            yield f
    else:
        with open(_local(url), "rb", buffering=1 << 20) as f:
            yield f


def _sibling(url: str, name: str) -> str | None:
    if url.startswith("pipe:") or "/" not in url:
        return None
    return url.rsplit("/", 1)[0] + "/" + name


def _read_text(url: str, retry: Retry = NO_RETRY) -> str | None:
    """The file's text, None if it does not exist or cannot be read (after retries)."""

    def read() -> str:
        if _is_fsspec(url):
            import fsspec

            with fsspec.open(url, "r") as f:
                return f.read()
        with open(_local(url)) as f:
            return f.read()

    try:
        return retry.call(f"reading {url}", read, fatal=(FileNotFoundError, IsADirectoryError))
    except (OSError, ValueError):
        return None


def _count_by_reading(url: str, retry: Retry) -> int:
    """Samples in a shard, by reading its tar headers (retried as the loader's reads are)."""
    for attempt in range(retry.retries + 1):
        n = 0
        try:
            with open_shard(url) as f:
                for _ in iter_samples(f, want=lambda i: False):
                    n += 1
            return n
        except Exception as e:  # noqa: BLE001 - retried; a shard damaged for good: use what is readable, say so
            if attempt >= retry.retries:
                log.warning("shard %s is damaged after %d samples (%s: %s): using those", url, n, type(e).__name__, e)
                return n
            wait = retry.delay(attempt + 1)
            log.warning(
                "counting the samples of %s failed (%s): retry %d/%d in %.1f s",
                url,
                e,
                attempt + 1,
                retry.retries,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def sample_counts(urls: list[str], retry: Retry = NO_RETRY) -> list[int]:
    """Samples per shard: from the sharder's `_shards.json` index, else each shard's manifest, else by
    reading the tar headers (the only way for pipe: URLs; logged, as it reads every shard once)."""
    indexes: dict[str, dict[str, int]] = {}
    counts = []
    scanned = 0
    for url in urls:
        base = url.rsplit("/", 1)[-1]
        idx_url = _sibling(url, INDEX_FILE)
        n = None
        if idx_url is not None:
            if idx_url not in indexes:
                text = _read_text(idx_url, retry)
                try:
                    indexes[idx_url] = (
                        {s["name"]: int(s["samples"]) for s in json.loads(text)["shards"]} if text else {}
                    )
                except (ValueError, KeyError, TypeError):
                    indexes[idx_url] = {}
            n = indexes[idx_url].get(base)
            if n is None and base.endswith(SHARD_SUFFIX):
                text = _read_text(url[: -len(SHARD_SUFFIX)] + MANIFEST_SUFFIX, retry)
                n = sum(1 for line in text.splitlines() if line.strip()) if text is not None else None
        if n is None:
            n = _count_by_reading(url, retry)
            scanned += 1
        counts.append(n)
    if scanned:
        log.info("counted the samples of %d shards by reading them (no _shards.json / manifest beside them)", scanned)
    return counts


@dataclass
class Bucket:
    """The shards of one bucket (a flat layout is one bucket named "", of no fixed size)."""

    name: str
    urls: list[str]
    counts: list[int]
    height: int = 0
    width: int = 0
    frames: int = 0

    @property
    def hw(self) -> tuple[int, int] | None:
        return (self.height, self.width) if self.height and self.width else None


def _bucket_index(spec: str, retry: Retry) -> tuple[str, dict] | None:
    """(root URL, parsed top-level index) when `spec` is one directory holding a bucketed layout."""
    spec = spec.strip()
    if "::" in spec or spec.startswith("pipe:") or _GLOB & set(spec) or "{" in spec:
        return None
    root = spec.rstrip("/")
    if not _is_fsspec(root) and not os.path.isdir(_local(root)):
        return None
    text = _read_text(root + "/" + INDEX_FILE, retry)
    try:
        index = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(index, dict) or not index.get("buckets"):
        return None
    return root, index


def layout(spec: str, use_buckets: bool = True, retry: Retry = NO_RETRY) -> list[Bucket]:
    """`DataConfig.shards` -> its buckets (one unnamed bucket for a flat layout, or for a bucketed one
    with use_buckets off), with shard URLs and sample counts. Buckets are sorted by name."""
    found = _bucket_index(spec, retry)
    if found is None:
        urls = retry.call(f"listing {spec}", lambda: expand(spec), fatal=(FileNotFoundError,))
        return [Bucket("", urls, sample_counts(urls, retry))]
    root, index = found
    by_bucket: dict[str, list[tuple[str, int]]] = {}
    for s in index["shards"]:
        name = s.get("bucket") or s["name"].split("/", 1)[0]
        by_bucket.setdefault(name, []).append((root + "/" + s["name"], int(s["samples"])))
    for entries in by_bucket.values():
        entries.sort()  # by name, like a directory listing: holdout_shards takes the last ones
    if not use_buckets:
        flat = [e for name in sorted(by_bucket) for e in by_bucket[name]]
        return [Bucket("", [u for u, _ in flat], [n for _, n in flat])]
    out = []
    for name in sorted(index["buckets"]):
        geo = index["buckets"][name]
        entries = by_bucket.get(name, [])
        out.append(
            Bucket(
                name,
                [u for u, _ in entries],
                [n for _, n in entries],
                int(geo["height"]),
                int(geo["width"]),
                int(geo.get("frames") or 0),
            )
        )
    return out
