"""Shard lists for the loader: expand `DataConfig.shards`, open shards as streams, find sample counts.

Accepted (several joined with '::'): a directory (its *.tar), a glob, a brace pattern
(`shard-{000000..000099}.tar`), an fsspec URL of any of these (`s3://bucket/shards/`,
`gs://b/shard-*.tar`, `file:///...`), or `pipe:COMMAND` writing a tar to stdout (the command runs in
a shell: it is part of your config, like WebDataset's pipe: URLs).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from braceexpand import braceexpand

from vldm.data.format import INDEX_FILE, MANIFEST_SUFFIX, SHARD_SUFFIX
from vldm.data.tario import iter_samples

log = logging.getLogger("vldm.data")
_GLOB = set("*?[")


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


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A readable binary stream of the shard; closed (and a pipe's process reaped) on exit."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            yield proc.stdout  # type: ignore[misc]
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


def _read_text(url: str) -> str | None:
    try:
        if _is_fsspec(url):
            import fsspec

            with fsspec.open(url, "r") as f:
                return f.read()
        with open(_local(url)) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def sample_counts(urls: list[str]) -> list[int]:
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
                text = _read_text(idx_url)
                try:
                    indexes[idx_url] = (
                        {s["name"]: int(s["samples"]) for s in json.loads(text)["shards"]} if text else {}
                    )
                except (ValueError, KeyError, TypeError):
                    indexes[idx_url] = {}
            n = indexes[idx_url].get(base)
            if n is None and base.endswith(SHARD_SUFFIX):
                text = _read_text(url[: -len(SHARD_SUFFIX)] + MANIFEST_SUFFIX)
                n = sum(1 for line in text.splitlines() if line.strip()) if text is not None else None
        if n is None:
            n = 0
            try:
                with open_shard(url) as f:
                    for _ in iter_samples(f, want=lambda i: False):
                        n += 1
            except Exception as e:  # a damaged shard: use what is readable, say so
                log.warning("shard %s is damaged after %d samples (%s: %s): using those", url, n, type(e).__name__, e)
            scanned += 1
        counts.append(n)
    if scanned:
        log.info("counted the samples of %d shards by reading them (no _shards.json / manifest beside them)", scanned)
    return counts
