"""Write one shard: its inputs in order -> `{name}.tar` + manifest + done marker. A plain function (Ray
runs it as a task; tests call it directly).

Crash safety:
- the tar is written under a temp name and renamed when complete; the manifest next; the done marker
  (`{name}.done.json`, the shard's summary) last. A shard is complete iff its done marker exists and
  the tar has the size it records. Anything else is redone from scratch, with the same samples under
  the same keys (deterministic inputs, clip placement and tar headers; x264 itself may differ in a
  few bits run to run).
- with buckets each bucket's tar, manifest and done marker go to OUTPUT/<bucket>/ (a flat layout of its
  own: only buckets that got a clip from this shard have one); the top-level done marker, written after
  all of them, names the buckets and is what makes the shard complete.
- a journal (`.{name}.journal.jsonl`) records when each input starts and ends. When a worker process
  dies (segfault in a decoder, OOM kill) Ray retries the task; an input that was being processed
  when a worker died twice in this run is recorded as `worker_crash` and skipped instead of killing
  the shard forever. The driver also reads journals for its progress line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from vldm.data.clips import Clip, ClipSpec, VideoError, open_video
from vldm.data.curate.filters import BORDER_EDGES, MOTION_EDGES, SHOT_EDGES, histogram
from vldm.data.curate.shots import read_shots
from vldm.data.format import (
    DONE_SUFFIX,
    EXT_JSON,
    EXT_MP4,
    EXT_TXT,
    MANIFEST_SUFFIX,
    SHARD_SUFFIX,
    ClipMeta,
    FailedRow,
    ManifestRow,
    RejectedRow,
    clip_key,
    source_id,
)
from vldm.data.sources import InputRecord, is_url
from vldm.data.tario import SampleWriter
from vldm.io import atomic_open, atomic_write_bytes

log = logging.getLogger("vldm.data")
CRASHES_BEFORE_SKIP = 2


class ShardWriteError(RuntimeError):
    """Writing the shard itself failed: the task fails (and a rerun redoes the shard)."""


def tar_path(out: Path, name: str) -> Path:
    return out / f"{name}{SHARD_SUFFIX}"


def done_path(out: Path, name: str) -> Path:
    return out / f"{name}{DONE_SUFFIX}"


def manifest_path(out: Path, name: str) -> Path:
    return out / f"{name}{MANIFEST_SUFFIX}"


def journal_path(out: Path, name: str) -> Path:
    return out / f".{name}.journal.jsonl"


def read_done(out: Path, name: str) -> dict[str, Any] | None:
    """The summary of a complete shard, or None if the shard must be (re)done. A bucketed shard is complete when
    each of its buckets' shards is."""
    try:
        summary = json.loads(done_path(out, name).read_text())
        if "buckets" in summary:
            return summary if all(read_done(out / b, name) is not None for b in summary["buckets"]) else None
        if tar_path(out, name).stat().st_size != summary["bytes"]:
            return None
        return summary
    except (OSError, ValueError, KeyError):
        return None


def shard_dirs(out: Path, summary: dict[str, Any]) -> list[Path]:
    """Directories holding the tars of a complete shard: OUTPUT itself, or its bucket directories."""
    return [out / b for b in summary["buckets"]] if "buckets" in summary else [out]


class _Sink:
    """One tar being written (the flat shard, or one bucket's part of it) with its manifest rows. The tar
    streams into a temp file beside its final name (vldm.io.atomic_open) and is renamed on `close`."""

    def __init__(self, directory: Path, name: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.name = directory, name
        self._file = atomic_open(tar_path(directory, name))
        self.writer = SampleWriter(self._file.__enter__())
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0

    def close(self) -> None:
        self.writer.close()
        self._file.__exit__(None, None, None)  # fsync + rename
        self.bytes = os.path.getsize(tar_path(self.dir, self.name))

    def discard(self) -> None:
        # the temp file is removed, nothing is renamed (the exception is handed to atomic_open, not raised)
        err = RuntimeError("shard abandoned")
        self._file.__exit__(type(err), err, None)

    def write_manifest(self) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in self.rows)
        atomic_write_bytes(manifest_path(self.dir, self.name), data)


def _stat(path: str) -> tuple[int, float | None]:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
        try:
            mtime = float(mtime) if mtime is not None else None
        except (TypeError, ValueError):
            mtime = None
        return int(info.get("size") or 0), mtime
    st = os.stat(path[len("file://") :] if path.startswith("file://") else path)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"not a regular file: {path}")
    return st.st_size, st.st_mtime


def _sha256(path: str) -> str:
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Journal:
    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id, self.attempt = path, run_id, uuid.uuid4().hex[:12]
        self._f = open(path, "a", encoding="utf-8")

    def event(self, ev: str, i: int, **kw: Any) -> None:
        self._f.write(json.dumps({"run": self.run_id, "attempt": self.attempt, "ev": ev, "i": i, **kw}) + "\n")
        self._f.flush()  # no fsync: a killed process leaves its writes in the page cache

    def close(self) -> None:
        self._f.close()


def read_journal(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass  # the last line of a killed writer may be cut
    except OSError:
        pass
    return events


def crashed_inputs(events: list[dict[str, Any]], run_id: str) -> dict[int, int]:
    """input index -> number of attempts of this run that died while processing it."""
    open_by_attempt: dict[str, int | None] = {}
    for ev in events:
        if ev.get("run") != run_id:
            continue
        if ev["ev"] == "start":
            open_by_attempt[ev["attempt"]] = ev["i"]
        elif ev["ev"] == "end" and open_by_attempt.get(ev["attempt"]) == ev["i"]:
            open_by_attempt[ev["attempt"]] = None
    return dict(Counter(i for i in open_by_attempt.values() if i is not None))


def write_shard(
    out_dir: str | Path,
    name: str,
    items: list[tuple[int, InputRecord | dict]],
    spec: ClipSpec,
    run_id: str = "",
    source_hash: bool = False,
) -> dict[str, Any]:
    """Process `items` [(input index, record)] in order into shard `name`; returns its summary (also
    written as the done marker). Bad inputs never raise: they are recorded in summary["failed"], clips a
    filter rejected in summary["rejected"]. With --shot-detector transnetv2 the shard's shots file must exist."""
    out = Path(out_dir)
    done = read_done(out, name)
    if done is not None:
        return done  # completed by an earlier attempt (e.g. the task was retried after it finished)
    t_start, cpu_start = time.time(), time.process_time()
    run_id = run_id or uuid.uuid4().hex
    shots = None
    if spec.shot_detector == "transnetv2":
        shots = read_shots(out, name)
        if shots is None:
            raise ShardWriteError(f"{name}: no shots file (the TransNetV2 stage runs before the shard)")
    jpath = journal_path(out, name)
    crashed = crashed_inputs(read_journal(jpath), run_id)
    journal = _Journal(jpath, run_id)
    sinks: dict[str, _Sink] = {}
    if not spec.buckets:
        sinks[""] = _Sink(out, name)  # the flat layout always has its tar, even an empty one
    failed: list[dict[str, Any]] = []
    partial: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    curation: dict[str, list[float]] = {"motion": [], "borders": [], "shot_seconds": []}
    stats = Counter()

    def sink(clip: Clip) -> _Sink:
        key = clip.bucket if spec.buckets else ""
        if key not in sinks:
            sinks[key] = _Sink(out / key, name)
        return sinks[key]

    try:
        for i, rec in items:
            rec = rec if isinstance(rec, InputRecord) else InputRecord(**rec)
            if crashed.get(i, 0) >= CRASHES_BEFORE_SKIP:
                failed.append(
                    vars(
                        FailedRow(
                            rec.path,
                            "worker_crash",
                            f"worker died {crashed[i]} times on it",
                            rec.caption,
                            rec.meta,
                            name,
                        )
                    )
                )
                continue
            journal.event("start", i)
            rec_shots = None
            if shots is not None:
                found = shots.get(i, {"error": "error", "message": "missing from the shots file"})
                if "error" in found:
                    failed.append(
                        vars(FailedRow(rec.path, found["error"], found["message"], rec.caption, rec.meta, name))
                    )
                    journal.event("end", i, clips=0, ok=False)
                    continue
                rec_shots = found["shots"]
                curation["shot_seconds"] += [b - a for a, b in rec_shots]
                stats["shots"] += len(rec_shots)
            n, secs, src_bytes, err = _process_input(
                rec, spec, source_hash, sink, rejected, curation, stats, name, rec_shots
            )
            stats["clips"] += n
            stats["seconds"] += secs
            stats["source_bytes"] += src_bytes
            if err is not None and n == 0:
                failed.append(vars(FailedRow(rec.path, err.reason, err.message, rec.caption, rec.meta, name)))
            elif err is not None:
                partial.append({"path": rec.path, "reason": err.reason, "error": err.message, "clips": n})
            journal.event("end", i, clips=n, ok=n > 0)
        for sk in sinks.values():
            sk.close()
    except BaseException:
        journal.close()
        for sk in sinks.values():
            sk.discard()
        raise
    for sk in sinks.values():
        sk.write_manifest()
    summary = {
        "name": name,
        "samples": sum(len(sk.rows) for sk in sinks.values()),
        "bytes": sum(sk.bytes for sk in sinks.values()),
        "seconds": round(stats["seconds"], 3),
        "inputs": len(items),
        "ok": len(items) - len(failed),
        "failed": failed,
        "partial": partial,
        "rejected": rejected,
        "curation": {
            "shot_detector": spec.shot_detector
            if (spec.shot_detector != "threshold" or spec.threshold_cuts)
            else "none",
            "clips_scored": len(curation["motion"]),
            "cuts": stats["cuts"],
            "shots": stats["shots"],
            "histograms": {
                "motion": histogram(curation["motion"], MOTION_EDGES),
                "borders": histogram(curation["borders"], BORDER_EDGES),
                "shot_seconds": histogram(curation["shot_seconds"], SHOT_EDGES),
            },
        },
        "source_bytes": stats["source_bytes"],
        "elapsed": round(time.time() - t_start, 3),
        "cpu_s": round(time.process_time() - cpu_start, 3),
        "run": run_id,
        "finished": time.time(),
        "latents": None,
    }
    if spec.buckets:
        summary["buckets"] = {}
        for key, sk in sorted(sinks.items()):
            part = {"name": name, "bucket": key, "samples": len(sk.rows), "bytes": sk.bytes, "latents": None}
            part.update({k: summary[k] for k in ("run", "finished")})
            atomic_write_bytes(done_path(sk.dir, name), json.dumps(part, indent=1).encode())
            summary["buckets"][key] = {"samples": len(sk.rows), "bytes": sk.bytes}
    atomic_write_bytes(done_path(out, name), json.dumps(summary, ensure_ascii=False, indent=1).encode())
    journal.close()
    jpath.unlink(missing_ok=True)
    return summary


def _process_input(
    rec: InputRecord,
    spec: ClipSpec,
    source_hash: bool,
    sink: Any,
    rejected: list[dict[str, Any]],
    curation: dict[str, list[float]],
    stats: Counter,
    shard: str,
    shots: list[list[float]] | None,
) -> tuple[int, float, int, VideoError | None]:
    """One input -> samples written to `sink(clip)`; (clips, seconds, source bytes, error or None)."""
    n = size = 0
    secs = 0.0
    try:
        try:
            size, mtime = _stat(rec.path)
        except (OSError, ValueError) as e:
            raise VideoError("missing", str(e)) from None
        if size == 0:
            raise VideoError("empty", "zero bytes")
        sha = _sha256(rec.path) if source_hash else None
        caption = rec.caption or ""
        sid = source_id(rec.path)
        counts: dict[str, int] = {}
        detector = spec.shot_detector if (spec.shot_detector != "threshold" or spec.threshold_cuts) else "none"
        try:
            with open_video(rec.path, spec, shots, counts) as (info, clips):
                if counts.get("borders") is not None:
                    curation["borders"].append(counts["borders"])
                for clip in clips:
                    key = clip_key(rec.path, clip.index)
                    curation["motion"].append(clip.scores.get("motion", 0.0))
                    if clip.rejected:
                        rejected.append(
                            vars(
                                RejectedRow(
                                    key,
                                    rec.path,
                                    clip.index,
                                    round(clip.start, 6),
                                    round(clip.end, 6),
                                    clip.rejected,
                                    clip.scores,
                                    shard,
                                )
                            )
                        )
                        continue
                    meta = ClipMeta(
                        key=key,
                        source=rec.path,
                        source_id=sid,
                        source_size=size,
                        source_mtime=mtime,
                        source_sha256=sha,
                        clip=clip.index,
                        start=round(clip.start, 6),
                        end=round(clip.end, 6),
                        fps=float(spec.fps),
                        frames=clip.frames,
                        height=clip.height,
                        width=clip.width,
                        caption=caption,
                        source_fps=info.fps,
                        source_width=info.width,
                        source_height=info.height,
                        source_codec=info.codec,
                        source_duration=info.duration,
                        rotation=clip.rotation,
                        meta=rec.meta,
                        bucket=clip.bucket,
                        shot=clip.shot,
                        shot_detector=detector,
                        scores=clip.scores,
                    )
                    target = sink(clip)
                    try:
                        target.writer.write(
                            key, {EXT_JSON: meta.to_json(), EXT_MP4: clip.mp4, EXT_TXT: caption.encode()}
                        )
                    except OSError as e:  # the output, not the input, is broken (disk full...): fail the shard
                        raise ShardWriteError(str(e)) from e
                    target.rows.append(
                        vars(
                            ManifestRow(
                                key, rec.path, clip.index, meta.start, meta.end, clip.frames, len(clip.mp4), caption
                            )
                        )
                    )
                    n += 1
                    secs += clip.frames / float(spec.fps)
        finally:
            stats["cuts"] += counts.get("cuts", 0)
        return n, secs, size, None
    except VideoError as e:
        return n, secs, size, e
    except ShardWriteError:
        raise
    except Exception as e:  # a bug or an exotic file: record it with its traceback, keep the shard going
        log.warning("unexpected error on %s:\n%s", rec.path, traceback.format_exc())
        return n, secs, size, VideoError("error", f"{type(e).__name__}: {e}")
