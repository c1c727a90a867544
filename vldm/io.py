"""Writing files, for every stage: atomic writes and the one video encoder / mp4 writer; and the one reader of
the record framing of W&B's run files (`leveldb_log_records`: training's W&B fallback and evaluation's reader
both count what a W&B service wrote, and neither may import the other).

Atomic: data goes to a temp file beside the target, is fsynced, then renamed over it, so a reader (the
loader, the eval pool, a resumed run) sees the old file or the whole new one, and an exception removes
the temp file. Temp names start with "." and contain ".tmp" (`.NAME.RANDOM.tmp`, or
`.NAME.RANDOM.tmp.EXT` from `atomic_path`), the patterns the sharder and the eval coordinator clean
up after a process killed mid-write. Permissions follow the umask like a plain open() (mkstemp alone
would leave 0600).

This module imports neither torch nor PyAV at load (Ray shard workers and config tools import it).
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path, suffix: str) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to stream into; it becomes `path` when the block exits without an exception."""
    p = Path(path)
    fd, tmp = _temp_beside(p, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path with `path`'s extension, for writers that take a file name and pick the format from it
    (safetensors, PIL, torch.save); it becomes `path` when the block exits without an exception."""
    p = Path(path)
    fd, tmp = _temp_beside(p, ".tmp" + p.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_path(tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------------- video
def fps_fraction(fps: float | Fraction) -> Fraction:
    """29.97 -> 30000/1001 (the NTSC rates are what people mean), 8.0 -> 8."""
    f = Fraction(fps).limit_denominator(1001)
    for ntsc in (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001)):
        if abs(float(f) - float(ntsc)) < 0.006:
            return ntsc
    return f


def encode_frames(
    frames: np.ndarray,
    fps: float | Fraction,
    *,
    codec: str = "libx264",
    container: str = "mp4",
    crf: int | None = 20,
    preset: str | None = "veryfast",
    pix_fmt: str | None = None,
    threads: int = 1,
    exact: bool = False,
) -> bytes:
    """(F, H, W, 3) uint8 RGB -> encoded video file bytes (PyAV).

    `exact`: bit-identical output run to run. x264's macroblock-tree rate control is not (measured:
    about 1 encode in 50 differs, even single-threaded), so it is turned off, at some cost in size."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    fmt = {"mkv": "matroska", "mov": "mov", "mp4": "mp4", "webm": "webm", "avi": "avi"}.get(container, container)
    opts: dict[str, str] = {}
    if codec in ("libx264", "libx265") and crf is not None:
        opts["crf"] = str(crf)
    if codec in ("libx264", "libx265") and preset:
        opts["preset"] = preset
    if codec == "libx264" and threads >= 1:
        # the codec context's thread_count does not reach x264's own threads: pin them
        opts["x264-params"] = f"threads={threads}:lookahead-threads=1" + (":mbtree=0" if exact else "")
    if codec == "libx265":
        opts["x265-params"] = f"log-level=error:pools={threads}:frame-threads=1"
    if codec == "libvpx-vp9":
        opts.update({"crf": str(crf if crf is not None else 30), "b": "0", "deadline": "realtime", "cpu-used": "8"})
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps_fraction(fps), options=opts)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt or {"mjpeg": "yuvj420p"}.get(codec, "yuv420p")
        stream.codec_context.thread_count = threads
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def to_uint8(videos: Any) -> Any:
    """(..., 3, f, h, w) torch tensor in [-1, 1] -> (..., f, h, w, 3) uint8 tensor (the layout writers take)."""
    from einops import rearrange

    u8 = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return rearrange(u8, "... c f h w -> ... f h w c")


def write_mp4(path: str | os.PathLike, frames: Any, fps: float = 8.0, crf: int = 18) -> Path:
    """Write one video as H.264 mp4, atomically: `frames` is (f, h, w, 3) uint8 or a (3, f, h, w) torch
    tensor in [-1, 1]. yuv420p needs even sizes: odd sizes are padded by repeating the last row/column."""
    if not isinstance(frames, np.ndarray):
        frames = to_uint8(frames).cpu().numpy()
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    data = encode_frames(np.ascontiguousarray(frames), fps, crf=crf)
    path = Path(path)
    with atomic_path(path) as tmp:  # `.NAME.*.tmp.mp4`: the eval coordinator's cleanup pattern
        tmp.write_bytes(data)
    return path


LOG_BLOCK = 32768


def leveldb_log_records(path: str | os.PathLike, magic: bytes) -> Iterator[bytes]:
    """The records of a LevelDB-style log file (W&B's `.wandb` run files): a 7-byte header starting with `magic`,
    then 32 KiB blocks of records framed as (crc32 u32, length u16, type u8); type 1 is a whole record, 2/3/4 the
    first/middle/last piece of one split across blocks. A record cut short (its writer killed mid-write) ends
    the log: a file whose writer died reads up to its last whole record."""
    data = Path(path).read_bytes()
    if data[: len(magic)] != magic:
        raise ValueError(f"{path} is not a {magic.decode(errors='replace')} log file (header {data[:7]!r})")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < 7:  # a block tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if (kind == 0 and length == 0) or pos + length > len(data):
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
