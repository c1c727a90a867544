"""Real videos for evaluation: listing and decoding clips (PyAV only; sample mp4s: `vldm.io.write_mp4`).

Real videos are given as a directory or glob of `.mp4` files, or of `.tar` shards (WebDataset style:
`<key>.mp4` members, with an optional `<key>.txt` or `<key>.json` {"caption": ...} beside them).
Containers are always closed (reference §4: leaked decoders are the usual host-RAM leak).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


@dataclass(frozen=True)
class VideoRef:
    """One real video: a file, or a member of a tar shard."""

    path: str
    member: str = ""
    size: int = 0

    @property
    def key(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path


def _expand(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in (*VIDEO_EXTS, ".tar"))
    if p.is_file():
        return [p]
    return sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())


def list_videos(spec: str, limit: int = 0) -> list[VideoRef]:
    """Videos named by `spec` in a deterministic (sorted) order; the first `limit` (0 = all)."""
    refs: list[VideoRef] = []
    for f in _expand(spec):
        if f.suffix.lower() == ".tar":
            with tarfile.open(f) as tf:
                members = sorted(
                    (m for m in tf.getmembers() if m.isfile() and Path(m.name).suffix.lower() in VIDEO_EXTS),
                    key=lambda m: m.name,
                )
                refs.extend(VideoRef(str(f), m.name, m.size) for m in members)
        elif f.suffix.lower() in VIDEO_EXTS:
            refs.append(VideoRef(str(f), "", f.stat().st_size))
        if limit and len(refs) >= limit:
            break
    if not refs:
        raise FileNotFoundError(f"no videos found at {spec!r} (.mp4 files or .tar shards with .mp4 members)")
    return refs[:limit] if limit else refs


def listing_digest(refs: list[VideoRef]) -> str:
    """Identity of a real-video set: sha256 over (file name, member, size); paths above the files are left
    out so that moving the data set does not invalidate cached statistics."""
    h = hashlib.sha256()
    for r in refs:
        h.update(f"{Path(r.path).name}::{r.member}::{r.size}\n".encode())
    return h.hexdigest()


def _open_bytes(ref: VideoRef) -> tuple[bytes | None, str | None]:
    """(video bytes or None for a plain file, caption or None)."""
    if not ref.member:
        side = Path(ref.path).with_suffix(".txt")
        return None, side.read_text().strip() if side.exists() else None
    with tarfile.open(ref.path) as tf:
        data = tf.extractfile(ref.member).read()
        stem = ref.member.rsplit(".", 1)[0]
        caption = None
        names = set(tf.getnames())
        if stem + ".txt" in names:
            caption = tf.extractfile(stem + ".txt").read().decode().strip()
        elif stem + ".json" in names:
            meta = json.loads(tf.extractfile(stem + ".json").read())
            caption = meta.get("caption") or meta.get("text")
    return data, caption


def read_clip(ref: VideoRef, num_frames: int, stride: int = 1) -> tuple[np.ndarray, str]:
    """The first `num_frames` frames at `stride` as (f, h, w, 3) uint8, and the caption ("" if none).

    Raises ValueError for a video that is too short, and whatever PyAV raises for a corrupt one.
    """
    data, caption = _open_bytes(ref)
    need = (num_frames - 1) * stride + 1
    frames: list[np.ndarray] = []
    container = av.open(io.BytesIO(data) if data is not None else ref.path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % stride == 0:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i + 1 >= need:
                break
    finally:
        container.close()
    if len(frames) < num_frames:
        raise ValueError(f"{ref.key}: {len(frames)} frames at stride {stride}, need {num_frames}")
    return np.stack(frames), caption or ""
