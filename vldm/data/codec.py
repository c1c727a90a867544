"""PyAV video reading shared by the sharder, the loader and the latent stage (encoding: `vldm.io`).

Every container is opened through `open_input` and closed by its context manager: PyAV frames and
packets keep native buffers alive until the container is closed, and long-running loaders that forget
this leak host RAM (pitfall 4 of the reference).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import av
import numpy as np

# Demuxers FFmpeg may use on inputs. Playlists (hls, concat), image sequences (image2: '%d' in a name
# expands to other files) and devices are not listed, so a crafted file cannot make FFmpeg read
# other files or the network. Audio demuxers are listed so audio-only files are recognised as such.
SAFE_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,mpegvideo,ogg,asf,ivf,h264,hevc,m4v,nut,"
    "mxf,yuv4mpegpipe,obu,wav,mp3,aac,flac"
)
_INPUT_OPTIONS = {"format_whitelist": SAFE_DEMUXERS, "protocol_whitelist": "file"}


@contextmanager
def open_input(
    source: str | bytes | IO[bytes], threads: int = 1, format: str | None = None, probe_decode: bool = True
) -> Iterator[Any]:
    """Open a video for reading; closes it (and a file object it opened) however the block exits.

    `source`: a local path (opened with the `file:` protocol, so names such as 'pipe:1.mp4' or
    'concat:a|b.mp4' are plain names), a URL fsspec can open, raw bytes, or a binary file object.
    `threads`: decoder threads (1 where parallelism comes from processes; 0 = FFmpeg decides).
    `format`: the demuxer, when known (our own clips are mp4): skips format probing.
    `probe_decode=False`: FFmpeg's stream-info probe skips decoding frames (it decodes the first ones
    just to fill in parameters an mp4 header already has). For our own H.264 clips only: it saves
    ~1.2 ms of a 13 ms 16x256x256 clip (measured; the frames decoded after are identical), while an
    arbitrary source may need the probe to learn its parameters.
    """
    fobj = None
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            target: Any = io.BytesIO(source)
        elif isinstance(source, str) and "://" in source and not source.startswith("file://"):
            import fsspec

            fobj = fsspec.open(source, "rb").open()
            target = fobj
        elif isinstance(source, str):
            path = source[len("file://") :] if source.startswith("file://") else source
            target = "file:" + os.path.abspath(path)
        else:
            target = source
        # stream options reach only the decoder find_stream_info opens for probing: PyAV makes a fresh
        # codec context for the real decoding afterwards
        extra = {} if probe_decode else {"stream_options": [{"skip_frame": "all"}]}
        container = av.open(target, "r", format=format, options=dict(_INPUT_OPTIONS), **extra)
        try:
            for s in container.streams.video:
                s.thread_type = "AUTO" if threads != 1 else "SLICE"
                s.codec_context.thread_count = threads
            yield container
        finally:
            container.close()
    finally:
        if fobj is not None:
            fobj.close()


def to_rgb(
    frame: av.VideoFrame, width: int | None = None, height: int | None = None, interpolation: str = "AREA"
) -> np.ndarray:
    """(H, W, 3) uint8 RGB. threads=1: PyAV's default lets swscale start a thread pool per call, which
    costs ~100x the conversion itself on small frames (measured: 5 ms vs 0.01 ms at 64x64)."""
    return frame.reformat(
        width=width, height=height, format="rgb24", interpolation=interpolation, threads=1
    ).to_ndarray()


def fit_frame(
    frame: av.VideoFrame,
    height: int,
    width: int,
    rotation: int = 0,
    content: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Resize so the (upright) frame covers height x width, centre-crop, return (H, W, 3) uint8 RGB.

    `rotation` is the display rotation in degrees (counter-clockwise, as FFmpeg reports it); the frame
    is turned upright before cropping, so portrait phone videos stay portrait.
    `content`: (y0, y1, x0, x1) of the picture to keep, in pixels of the upright frame (inside black bars):
    that box is what covers height x width, and the crop stays inside it.
    """
    sw, sh = frame.width, frame.height
    quarter = (round(rotation / 90) % 4) if rotation else 0
    dw, dh = (sh, sw) if quarter % 2 else (sw, sh)  # displayed size
    if content is not None and content != (0, dh, 0, dw):
        return _fit_content(frame, height, width, quarter, dh, dw, content)
    scale = max(width / dw, height / dh)
    rw, rh = max(width, round(dw * scale)), max(height, round(dh * scale))
    # AREA averages when shrinking (no aliasing); bicubic when enlarging
    interp = "AREA" if scale < 1 else "BICUBIC"
    tw, th = (rh, rw) if quarter % 2 else (rw, rh)
    img = to_rgb(frame, tw, th, interp)
    if quarter:
        img = np.rot90(img, k=quarter)  # counter-clockwise, like the display matrix
    y0, x0 = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
    return np.ascontiguousarray(img[y0 : y0 + height, x0 : x0 + width])


def _fit_content(
    frame: av.VideoFrame, height: int, width: int, quarter: int, dh: int, dw: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    # the whole frame is resized (one swscale pass, no intermediate full-size copy) by the scale at which the
    # content box covers the target; the crop is then centred on the box and kept inside it, one pixel in from
    # its edges (area resampling blends the bar into the outermost pixel)
    y0, y1, x0, x1 = box
    scale = max(width / max(x1 - x0 - 2, 1), height / max(y1 - y0 - 2, 1))
    rw, rh = max(width, round(dw * scale)), max(height, round(dh * scale))
    interp = "AREA" if scale < 1 else "BICUBIC"
    tw, th = (rh, rw) if quarter % 2 else (rw, rh)
    img = to_rgb(frame, tw, th, interp)
    if quarter:
        img = np.rot90(img, k=quarter)
    sy, sx = img.shape[0] / dh, img.shape[1] / dw

    def place(lo: int, hi: int, s: float, n: int, total: int) -> int:
        a, b = math.ceil((lo + 1) * s), math.floor((hi - 1) * s) - n  # first and last allowed start
        start = round((lo + hi) / 2 * s - n / 2)
        start = min(max(start, a), max(a, b))
        return min(max(start, 0), total - n)

    top, left = place(y0, y1, sy, height, img.shape[0]), place(x0, x1, sx, width, img.shape[1])
    return np.ascontiguousarray(img[top : top + height, left : left + width])


_CHUNK = 1 << 16  # elements: 256 KiB of float32, stays in L2 between the three passes
_SCALE, _ONE = np.float32(1 / 127.5), np.float32(1.0)


def u8_to_unit_range(src: np.ndarray, dst: np.ndarray) -> None:
    """dst (float32, same shape, contiguous) = src / 127.5 - 1, bit for bit what the one-line numpy
    expression `src * float32(1/127.5) - 1` gives, at 0.6x its cost (1.1 vs 1.8 ms per 16x256x256
    clip measured): the plain cast uint8 -> float32 takes numpy's fast path while a mixed-type multiply
    takes its slow buffered one, and working in chunks keeps each chunk in cache for the multiply and
    the subtract."""
    if not dst.flags.c_contiguous:  # reshape(-1) would silently write into a copy
        raise ValueError("u8_to_unit_range needs a contiguous destination")
    s, d = np.ascontiguousarray(src).reshape(-1), dst.reshape(-1)
    for i in range(0, s.size, _CHUNK):
        c = d[i : i + _CHUNK]
        c[...] = s[i : i + _CHUNK]
        np.multiply(c, _SCALE, out=c)
        np.subtract(c, _ONE, out=c)


def _planar_rgb_into(frame: av.VideoFrame, dst: np.ndarray) -> None:
    """Write the frame as planar RGB into dst (3, H, W): FFmpeg converts to gbrp and each plane is one
    contiguous copy. Producing channels-first this way costs less than converting to packed RGB, and
    far less than transposing packed frames afterwards (measured 1.6 vs 3.1 ms per 16x128x128 clip)."""
    r = frame.reformat(format="gbrp", threads=1)
    for ch, idx in ((0, 2), (1, 0), (2, 1)):  # gbrp planes are G, B, R
        p = r.planes[idx]
        dst[ch] = np.frombuffer(p, np.uint8).reshape(r.height, p.line_size)[:, : r.width]


def decode_window(
    source: str | bytes,
    start: int,
    num_frames: int,
    stride: int = 1,
    size: tuple[int, int] | None = None,
    threads: int = 1,
    format: str | None = None,
    channels_first: bool = False,
    out: np.ndarray | None = None,
    probe_decode: bool = True,
) -> np.ndarray:
    """Frames start, start+stride, ... (num_frames of them) of a stored clip -> (F, H, W, 3) uint8, or
    (3, F, H, W) with `channels_first` (the model's layout, without a transpose).

    `out`: a (3, F, H, W) uint8 array to decode into (channels_first only): the loader passes its batch
    slot, or a reused clip buffer it then converts to float (no per-clip allocation, no collate copy).
    `probe_decode=False` for clips this project wrote (see open_input).
    Decoding stops after the last wanted frame. `size` (H, W) resizes + centre-crops when the stored
    clip has another size. Raises ValueError if the clip has fewer frames than asked for.
    """
    if out is not None and (not channels_first or out.dtype != np.uint8):
        raise ValueError("out= must be a uint8 (3, F, H, W) array, with channels_first=True")
    wanted = start + (num_frames - 1) * stride
    n = 0
    with open_input(source, threads=threads, format=format, probe_decode=probe_decode) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start and (i - start) % stride == 0:
                same = size is None or (frame.height, frame.width) == tuple(size)
                h, w = (frame.height, frame.width) if same else size
                if out is None:  # filled in place: no stack copy
                    out = np.empty((3, num_frames, h, w) if channels_first else (num_frames, h, w, 3), np.uint8)
                elif out.shape != (3, num_frames, h, w):
                    raise ValueError(f"clip frames are {h}x{w}, the destination is {out.shape}")
                if channels_first and same:
                    _planar_rgb_into(frame, out[:, n])
                else:
                    img = to_rgb(frame) if same else fit_frame(frame, size[0], size[1])
                    if channels_first:
                        out[:, n] = img.transpose(2, 0, 1)
                    else:
                        out[n] = img
                n += 1
            if i >= wanted:
                break
    if out is None or n < num_frames:
        raise ValueError(f"clip has {n} of the {num_frames} frames asked for (start {start}, stride {stride})")
    return out


def decode_all(source: str | bytes, threads: int = 1, format: str | None = None) -> np.ndarray:
    """Every frame -> (F, H, W, 3) uint8 (for the latent stage and tests)."""
    with open_input(source, threads=threads, format=format) as container:
        frames = [to_rgb(f) for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames")
    return np.stack(frames)
