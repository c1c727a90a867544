"""Per-video work, as plain functions (no Ray): cut one source video into encoded clips.

Resampling is by timestamps: target frame k sits at t0 + k / fps and takes the source frame whose
timestamp is nearest (ties go to the earlier frame). So 60, 29.97 or 8 fps sources all give clips at
the requested rate; a slower source repeats frames (reject it with `min_fps`).

Clip placement walks the resampled frames once: a clip starts every `stride` frames, at most
`max_clips` per video (or `max_clips` spread evenly over the video with `spread`), and with cut
detection a clip never spans a scene cut: placement restarts at the cut. Only one clip's frames
(at the target size) are held at a time; decoding stops once no more clips are wanted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np

from vldm.config.data import ShardConfig, parse_size
from vldm.data.codec import fit_frame, open_input
from vldm.data.probe import VideoInfo, probe
from vldm.io import encode_frames, fps_fraction


class VideoError(Exception):
    """A source video that gives no clip; `reason` is one of format.REASONS."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ClipSpec:
    frames: int
    fps: Fraction
    height: int
    width: int
    stride: int  # resampled frames between the starts of consecutive clips
    max_clips: int = 0
    spread: bool = False
    cut_threshold: float = 0.0
    min_fps: float = 0.0
    crf: int = 20
    preset: str = "veryfast"
    timeout: float = 600.0
    threads: int = 1  # codec threads: parallelism comes from Ray workers

    @classmethod
    def from_config(cls, cfg: ShardConfig) -> ClipSpec:
        h, w = parse_size(cfg.size)
        return cls(
            frames=cfg.frames,
            fps=fps_fraction(cfg.fps),
            height=h,
            width=w,
            stride=cfg.clip_stride or cfg.frames,
            max_clips=cfg.max_clips,
            spread=cfg.spread,
            cut_threshold=cfg.cut_threshold,
            min_fps=cfg.min_fps,
            crf=cfg.crf,
            preset=cfg.preset,
            timeout=cfg.video_timeout,
        )

    def resampled_frames(self, duration: float) -> int:
        return math.floor(duration * self.fps + 1e-6)

    def expected_clips(self, duration: float | None) -> int:
        """Clips a video of `duration` seconds gives without cuts (for planning)."""
        if not duration:
            return 0
        n = self.resampled_frames(duration)
        if n < self.frames:
            return 0
        count = (n - self.frames) // self.stride + 1
        return min(count, self.max_clips) if self.max_clips else count

    def planned_starts(self, duration: float | None) -> list[int] | None:
        """With `spread`: explicit clip starts evenly over the video; None = every `stride` frames."""
        if not (self.spread and self.max_clips and duration):
            return None
        n = self.resampled_frames(duration)
        if n < self.frames or (n - self.frames) // self.stride + 1 <= self.max_clips:
            return None
        last = n - self.frames
        if self.max_clips == 1:
            return [last // 2]
        return [round(i * last / (self.max_clips - 1)) for i in range(self.max_clips)]


@dataclass
class Clip:
    index: int
    start: float  # seconds from the first frame of the source
    end: float
    frames: int
    mp4: bytes
    rotation: int


class _Cutter:
    """Turns the stream of resampled frames into clips (see the module docstring)."""

    def __init__(self, spec: ClipSpec, planned: list[int] | None):
        self.spec = spec
        self.planned = planned
        self.next_start = planned[0] if planned else 0
        self.buf: list[tuple[int, np.ndarray]] = []  # consecutive resampled frames (index, image)
        self.last_thumb: np.ndarray | None = None
        self.made = 0
        self.cuts = 0
        self.rotation = 0

    @property
    def done(self) -> bool:
        if self.planned is not None:
            return self.made >= len(self.planned)
        return bool(self.spec.max_clips) and self.made >= self.spec.max_clips

    def _is_cut(self, img: np.ndarray) -> bool:
        # mean |difference| of a coarse grey thumbnail: cheap, and robust to codec noise
        sy, sx = max(1, img.shape[0] // 32), max(1, img.shape[1] // 32)
        thumb = img[::sy, ::sx].mean(axis=2, dtype=np.float32) / 255.0
        cut = self.last_thumb is not None and float(np.abs(thumb - self.last_thumb).mean()) > self.spec.cut_threshold
        self.last_thumb = thumb
        return cut

    def push(self, k: int, frame: av.VideoFrame) -> Clip | None:
        spec = self.spec
        if k < self.next_start and not spec.cut_threshold:
            return None  # between clips: no need to even convert the frame
        img = fit_frame(frame, spec.height, spec.width, self.rotation)
        if spec.cut_threshold and self._is_cut(img):
            self.cuts += 1
            self.buf.clear()
            self.next_start = max(self.next_start, k)
        if k < self.next_start:
            return None
        self.buf.append((k, img))
        if len(self.buf) < spec.frames:
            return None
        start = self.buf[0][0]
        frames = np.stack([im for _, im in self.buf])
        mp4 = encode_frames(frames, spec.fps, crf=spec.crf, preset=spec.preset, threads=spec.threads)
        clip = Clip(
            index=self.made,
            start=float(start / spec.fps),
            end=float((start + spec.frames) / spec.fps),
            frames=spec.frames,
            mp4=mp4,
            rotation=self.rotation,
        )
        self.made += 1
        nxt = start + spec.stride
        if self.planned is not None:
            nxt = max(nxt, self.planned[self.made]) if self.made < len(self.planned) else math.inf
        self.next_start = nxt
        self.buf = [(i, im) for i, im in self.buf if i >= nxt]
        return clip


@contextmanager
def open_video(source: str | bytes | IO[bytes], spec: ClipSpec) -> Iterator[tuple[VideoInfo, Iterator[Clip]]]:
    """Open and probe a source; yields (info, clips). Raises VideoError with a reason on bad input.

    The clip iterator raises VideoError("decode_error" / "too_short" / "timeout") when it ends
    without a clip or decoding fails; clips already yielded stay valid (the caller keeps them).
    """
    with ExitStack() as stack:
        try:
            container = stack.enter_context(open_input(source, threads=spec.threads))
            try:
                info = probe(container)
            except LookupError:
                raise VideoError("no_video", "no video stream") from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise VideoError("missing", str(e)) from None
        except av.FFmpegError as e:
            raise VideoError("unreadable", str(e)) from None
        if info.fps and spec.min_fps and info.fps < spec.min_fps:
            raise VideoError("low_fps", f"{info.fps:.3f} fps < --min-fps {spec.min_fps}")
        # cheap early exit: the header already says it is too short (with a frame of slack)
        if info.duration is not None and info.duration * spec.fps < spec.frames - 1:
            raise VideoError("too_short", f"{info.duration:.2f} s at {float(spec.fps):g} fps < {spec.frames} frames")
        yield info, _clips(container, info, spec)


def _clips(container: Any, info: VideoInfo, spec: ClipSpec) -> Iterator[Clip]:
    stream = container.streams.video[0]
    tb = Fraction(stream.time_base) if stream.time_base else None
    src_fps = fps_fraction(info.fps) if info.fps else spec.fps
    cutter = _Cutter(spec, spec.planned_starts(info.duration))
    deadline = time.monotonic() + spec.timeout
    # once no further clip fits in what the header says is left, stop decoding (the tail of a video is
    # often a quarter of its frames); 2% + 1 frame of slack for headers that round the duration down
    last_useful = spec.resampled_frames(info.duration) * 1.02 + 1 if info.duration else math.inf
    t0 = prev_t = None
    prev = None
    k = 0  # next resampled frame
    n = 0  # decoded source frames
    stopped = False  # decoding stopped before the end: no further clip would fit
    try:
        for frame in container.decode(stream):
            if time.monotonic() > deadline:
                raise VideoError("timeout", f"over {spec.timeout:g} s")
            t = frame.pts * tb if (frame.pts is not None and tb is not None) else Fraction(n) / src_fps
            n += 1
            if t0 is None:
                t0 = t
                cutter.rotation = int(round((frame.rotation or 0) / 90.0) * 90) % 360
            if prev_t is not None and t <= prev_t:
                continue  # a repeated/out-of-order timestamp (broken muxers): keep time moving forward
            while True:
                g = t0 + Fraction(k) / spec.fps
                if g > t:
                    break
                # nearest source frame to the target time; ties go to the earlier one
                chosen = prev if (prev is not None and g - prev_t <= t - g) else frame
                clip = cutter.push(k, chosen)
                k += 1
                if clip is not None:
                    yield clip
                if cutter.done:
                    return
            prev, prev_t = frame, t
            if cutter.next_start + spec.frames > last_useful:
                stopped = True
                break
        if prev is not None and not stopped:
            # the stream ended: the last source frame is shown for one frame period
            t_end = prev_t + 1 / src_fps
            while t0 + Fraction(k) / spec.fps < t_end and not cutter.done:
                clip = cutter.push(k, prev)
                k += 1
                if clip is not None:
                    yield clip
    except av.FFmpegError as e:
        raise VideoError("decode_error", f"after {n} frames: {e}") from None
    if cutter.made:
        return
    if n == 0:
        raise VideoError("decode_error", "no frame could be decoded")
    decoded = float((prev_t - t0) + 1 / src_fps) if prev_t is not None else 0.0
    if not stopped and info.duration and decoded < 0.9 * info.duration and info.duration * spec.fps >= spec.frames:
        raise VideoError("decode_error", f"truncated: decoded {decoded:.2f} s of {info.duration:.2f} s")
    why = f" ({cutter.cuts} scene cuts)" if cutter.cuts else ""
    raise VideoError("too_short", f"{k} frames at {float(spec.fps):g} fps < {spec.frames}{why}")
