"""List the inputs of a sharding run: a directory of videos, a manifest, or a failed.jsonl to retry.

An input is an `InputRecord(path, caption, meta)`. Captions come from the manifest's `caption` column,
else a sidecar `name.txt`, else the `caption` field of a sidecar `name.json` (whose other fields become
metadata). Local paths and fsspec URLs are both accepted; nothing here opens a video.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vldm.data.format import FAILURE_COLUMNS

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")
_SIDECAR_MAX = 1 << 20  # a sidecar larger than 1 MiB is not a caption: ignore it


@dataclass
class InputRecord:
    path: str
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _read_small(path: str) -> bytes | None:
    try:
        if is_url(path):
            fs, p = _fs(path)
            if not fs.exists(p) or fs.size(p) > _SIDECAR_MAX:
                return None
            return fs.cat_file(p)
        p = Path(_strip_file(path))
        if not p.is_file() or p.stat().st_size > _SIDECAR_MAX:
            return None
        return p.read_bytes()
    except (OSError, ValueError):
        return None


def _sidecars(video: str) -> tuple[str | None, dict[str, Any]]:
    stem = video.rsplit(".", 1)[0]
    caption, meta = None, {}
    raw = _read_small(stem + ".json")
    if raw is not None:
        try:
            data = json.loads(raw)
            if isinstance(data, dict):
                caption = data.pop("caption", None)
                meta = data
        except (ValueError, UnicodeDecodeError):
            pass
    txt = _read_small(stem + ".txt")
    if txt is not None:
        caption = txt.decode("utf-8", "replace").strip()
    return (str(caption) if caption is not None else None), meta


def list_directory(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Videos under `root`, recursively, sorted; hidden files and directories are skipped."""
    exts = tuple("." + e.lower().lstrip(".") for e in extensions)
    if is_url(root):
        fs, p = _fs(root)
        found = [
            f for f in fs.find(p) if f.lower().endswith(exts) and not any(part.startswith(".") for part in f.split("/"))
        ]
        return sorted(fs.unstrip_protocol(f) for f in found)
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.abspath(_strip_file(root))):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(exts))
    return sorted(out)


def _manifest_rows(path: str) -> list[dict[str, Any]]:
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        if is_url(path):
            fs, p = _fs(path)
            with fs.open(p, "rb") as f:
                return pq.read_table(f).to_pylist()
        return pq.read_table(_strip_file(path)).to_pylist()
    raw = _read_any(path).decode("utf-8-sig")
    if low.endswith((".csv", ".tsv")):
        return list(csv.DictReader(raw.splitlines(), delimiter="\t" if low.endswith(".tsv") else ","))
    if low.endswith(".json") and raw.lstrip().startswith("["):
        return json.loads(raw)
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _read_any(path: str) -> bytes:
    if is_url(path):
        fs, p = _fs(path)
        return fs.cat_file(p)
    return Path(_strip_file(path)).read_bytes()


def read_manifest(path: str) -> list[InputRecord]:
    """Rows with a `path` (relative paths are relative to the manifest), optional `caption`; other
    columns become metadata. failed.jsonl rows (path, caption, meta, reason, error) read back as inputs."""
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    records = []
    for i, row in enumerate(_manifest_rows(path)):
        if not isinstance(row, dict) or not row.get("path"):
            raise ValueError(f"{path}: row {i + 1} has no 'path'")
        row = dict(row)
        p = str(row.pop("path"))
        if not is_url(p) and not os.path.isabs(_strip_file(p)):
            p = f"{base}/{p}" if is_url(base) else os.path.normpath(os.path.join(_strip_file(base), p))
        caption = row.pop("caption", None)
        meta = row.pop("meta", None)
        for col in FAILURE_COLUMNS:
            row.pop(col, None)
        merged = dict(meta) if isinstance(meta, dict) else {}
        merged.update({k: v for k, v in row.items() if v is not None})
        if caption is None or caption == "" or caption != caption:  # missing, empty CSV cell or NaN
            caption, side_meta = _sidecars(p)
        else:
            side_meta = {}
        records.append(InputRecord(p, None if caption is None else str(caption), {**side_meta, **merged}))
    return records


def list_inputs(source: str, extensions: tuple[str, ...]) -> tuple[list[InputRecord], int]:
    """(records without duplicate paths, number of duplicates dropped). `source` is a directory,
    a manifest file, or a single video."""
    local = _strip_file(source)
    if is_url(source):
        fs, p = _fs(source)
        is_dir = fs.isdir(p)
    else:
        is_dir = os.path.isdir(local)
    if is_dir:
        records = []
        for v in list_directory(source, extensions):
            caption, meta = _sidecars(v)
            records.append(InputRecord(v, caption, meta))
    elif source.lower().endswith(MANIFEST_SUFFIXES):
        records = read_manifest(source)
    elif is_url(source) or os.path.exists(local):
        caption, meta = _sidecars(source)
        records = [InputRecord(source if is_url(source) else os.path.abspath(local), caption, meta)]
    else:
        raise FileNotFoundError(f"INPUT {source!r} is neither a directory, a manifest nor a video")
    seen: set[str] = set()
    unique = []
    for r in records:
        if r.path not in seen:
            seen.add(r.path)
            unique.append(r)
    return unique, len(records) - len(unique)
