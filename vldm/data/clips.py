"""Per-video work, as plain functions (no Ray): cut one source video into encoded clips.

Resampling is by timestamps: target frame k sits at t0 + k / fps and takes the source frame whose
timestamp is nearest (ties go to the earlier frame). So 60, 29.97 or 8 fps sources all give clips at
the requested rate; a slower source repeats frames (reject it with `min_fps`).

Clip placement walks the resampled frames once: a clip starts every `stride` frames, at most
`max_clips` per video (or `max_clips` spread evenly over the video with `spread`), and with shot
detection a clip never spans a cut: placement restarts at the cut (threshold detector: a frame that
differs too much from the previous one; TransNetV2: shots given up front, in source seconds, and
frames of a transition are never used). Only one clip's frames (at the target size) are held at a
time; decoding stops once no more clips are wanted.

Curation (vldm.data.curate): with buckets the source's aspect picks the clip size and a shot's remaining
length the clip length; black bars found on a few sampled frames are cropped away (or the source is
rejected); every clip gets a motion score, and static or jittery clips are rejected before encoding
(their index is used up, so the keys of the kept clips do not depend on the thresholds).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np

from vldm.config.data import ShardConfig, parse_size
from vldm.data.codec import fit_frame, open_input, to_rgb
from vldm.data.curate.buckets import Bucket, choose_size, lengths_for, parse_buckets
from vldm.data.curate.filters import (
    BORDER_SAMPLES,
    BORDER_WIDTH,
    Borders,
    detect_borders,
    frame_difference,
    motion_score,
    motion_verdict,
    thumb,
)
from vldm.data.probe import VideoInfo, probe
from vldm.io import encode_frames, fps_fraction

SHOT_EPS = 1e-6  # seconds: shot bounds are stored rounded to microseconds


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
    shot_detector: str = "threshold"  # none / threshold / transnetv2 (shots then come from open_video's caller)
    back_to_back: bool = False  # stride = each clip's own length (clip_stride 0 with several lengths)
    buckets: tuple[Bucket, ...] = ()  # empty: one size, height x width x frames
    static_threshold: float = 0.0
    jitter_threshold: float = 0.0
    borders: str = "off"  # off / detect / crop / reject
    border_black: float = 0.1
    border_min: float = 0.02
    border_max: float = 0.6

    @classmethod
    def from_config(cls, cfg: ShardConfig) -> ClipSpec:
        h, w = parse_size(cfg.size)
        buckets = parse_buckets(cfg.buckets)
        frames = cfg.frames
        if buckets:  # the shortest length: planning estimates and "too short" use it
            frames = min(b.frames for b in buckets)
            h, w = buckets[0].height, buckets[0].width
        return cls(
            frames=frames,
            fps=fps_fraction(cfg.fps),
            height=h,
            width=w,
            stride=cfg.clip_stride or frames,
            max_clips=cfg.max_clips,
            spread=cfg.spread,
            cut_threshold=cfg.cut_threshold,
            min_fps=cfg.min_fps,
            crf=cfg.crf,
            preset=cfg.preset,
            timeout=cfg.video_timeout,
            shot_detector=cfg.shot_detector,
            back_to_back=cfg.clip_stride == 0,
            buckets=buckets,
            static_threshold=cfg.static_threshold,
            jitter_threshold=cfg.jitter_threshold,
            borders=cfg.borders,
            border_black=cfg.border_black,
            border_min=cfg.border_min,
            border_max=cfg.border_max,
        )

    @property
    def threshold_cuts(self) -> bool:
        return self.shot_detector == "threshold" and self.cut_threshold > 0

    def layout(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, ...]]:
        """((clip height, width), clip lengths longest first) for an upright picture of height x width."""
        if not self.buckets:
            return (self.height, self.width), (self.frames,)
        size = choose_size(self.buckets, height, width)
        return size, lengths_for(self.buckets, size)

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
    mp4: bytes  # empty when rejected
    rotation: int
    height: int = 0
    width: int = 0
    shot: int = 0  # index of the shot the clip is in (0 without shot detection)
    scores: dict[str, Any] = field(default_factory=dict)
    rejected: str | None = None  # a filter's reason (format.CLIP_REASONS); the clip was not encoded

    @property
    def bucket(self) -> str:
        return Bucket(self.height, self.width, self.frames).name


class _Cutter:
    """Turns the stream of resampled frames into clips (see the module docstring)."""

    def __init__(
        self,
        spec: ClipSpec,
        planned: list[int] | None,
        shots: list[list[float]] | None = None,
        borders: Borders | None = None,
    ):
        self.spec = spec
        self.planned = planned
        self.next_start = planned[0] if planned else 0
        self.buf: list[tuple[int, np.ndarray, np.ndarray]] = []  # consecutive resampled frames (index, image, thumb)
        self.last_thumb: np.ndarray | None = None
        self.made = 0
        self.cuts = 0
        self.rotation = 0
        self.shots = shots
        self.shot_starts = [a for a, _ in shots] if shots else []
        self.borders = borders
        self.shot: int | None = 0
        self.thr_shot = 0  # shots seen by the threshold detector
        self.size: tuple[int, int] | None = None
        self.lengths: tuple[int, ...] = (spec.frames,)
        self.content: tuple[int, int, int, int] | None = None

    @property
    def done(self) -> bool:
        if self.planned is not None:
            return self.made >= len(self.planned)
        return bool(self.spec.max_clips) and self.made >= self.spec.max_clips

    @property
    def min_len(self) -> int:
        return self.lengths[-1]

    def setup(self, frame: av.VideoFrame, rotation: int) -> None:
        """On the first frame: the upright size, the picture inside the bars, the clip size and lengths."""
        self.rotation = rotation
        dw, dh = (frame.height, frame.width) if (rotation // 90) % 2 else (frame.width, frame.height)
        h, w = dh, dw
        if self.borders is not None and self.spec.borders == "crop" and self.borders.area > 0:
            y0, y1, x0, x1 = self.content = self.borders.content_box(dh, dw)
            h, w = y1 - y0, x1 - x0
        self.size, self.lengths = self.spec.layout(h, w)

    def _shot_of(self, t: Fraction | None, th: np.ndarray | None) -> int | None:
        if self.shots is not None:
            if t is None:
                return self.shot
            j = bisect.bisect_right(self.shot_starts, float(t) + SHOT_EPS) - 1
            return j if j >= 0 and float(t) <= self.shots[j][1] + SHOT_EPS else None  # None: a transition frame
        if th is not None and self.spec.threshold_cuts:
            if self.last_thumb is not None and frame_difference(th, self.last_thumb) > self.spec.cut_threshold:
                self.thr_shot += 1
            self.last_thumb = th
        return self.thr_shot

    def push(self, k: int, frame: av.VideoFrame, t: Fraction | None = None) -> list[Clip]:
        spec = self.spec
        if k < self.next_start and not spec.threshold_cuts:
            if self.shots is not None:  # the buffer is empty here: only the shot is followed
                shot = self._shot_of(t, None)
                self.cuts += shot != self.shot and shot is not None
                self.shot = shot
            return []  # between clips: no need to even convert the frame
        assert self.size is not None, "setup() first"
        img = fit_frame(frame, self.size[0], self.size[1], self.rotation, self.content)
        th = thumb(img)
        shot = self._shot_of(t, th)
        out: list[Clip] = []
        if shot != self.shot:
            self.cuts += shot is not None  # a new shot begins (a transition's frames are not one)
            out += self._flush()
            self.buf.clear()
            self.shot = shot
            self.next_start = max(self.next_start, k)
        if shot is None or k < self.next_start:
            if shot is None:
                self.next_start = max(self.next_start, k + 1)
            return out
        self.buf.append((k, img, th))
        if len(self.buf) >= self.lengths[0]:
            out.append(self._emit(self.lengths[0]))
        return out

    def finish(self) -> list[Clip]:
        """At the end of the stream: a shorter bucket's clip from what is left, when one fits."""
        return self._flush()

    def _flush(self) -> list[Clip]:
        fits = [n for n in self.lengths if n <= len(self.buf)]
        if len(self.lengths) < 2 or not fits or self.done:
            return []
        return [self._emit(fits[0])]

    def _emit(self, length: int) -> Clip:
        spec = self.spec
        start = self.buf[0][0]
        part = self.buf[:length]
        motion = motion_score([t for _, _, t in part])
        scores: dict[str, Any] = {"motion": round(motion, 6)}
        if self.borders is not None:
            scores["borders"] = self.borders.as_dict()
        verdict = motion_verdict(motion, spec.static_threshold, spec.jitter_threshold)
        mp4 = b""
        if verdict is None:
            frames = np.stack([im for _, im, _ in part])
            mp4 = encode_frames(frames, spec.fps, crf=spec.crf, preset=spec.preset, threads=spec.threads)
        assert self.size is not None
        clip = Clip(
            index=self.made,
            start=float(start / spec.fps),
            end=float((start + length) / spec.fps),
            frames=length,
            mp4=mp4,
            rotation=self.rotation,
            height=self.size[0],
            width=self.size[1],
            shot=self.shot or 0,
            scores=scores,
            rejected=verdict,
        )
        self.made += 1
        nxt = start + (length if spec.back_to_back else spec.stride)
        if self.planned is not None:
            nxt = max(nxt, self.planned[self.made]) if self.made < len(self.planned) else math.inf
        self.next_start = nxt
        self.buf = [b for b in self.buf if b[0] >= nxt]
        return clip


def sample_frames(source: str | bytes, info: VideoInfo, n: int = BORDER_SAMPLES) -> list[np.ndarray]:
    """A few upright RGB frames spread over the source (at 10%, 30%, ... of its duration), read by seeking to the
    keyframe before each point, at most BORDER_WIDTH wide. Whatever cannot be read is left out."""
    frames: list[np.ndarray] = []
    with open_input(source) as container:
        s = container.streams.video[0]
        tb = Fraction(s.time_base) if s.time_base else None
        targets = [(i + 0.5) / n * info.duration for i in range(n)] if (info.duration and tb) else [None]
        for target in targets:
            try:
                if target is not None:
                    container.seek(int(target / tb) + (s.start_time or 0), stream=s, backward=True, any_frame=False)
                got = 0
                for f in container.decode(s):
                    w = min(f.width, BORDER_WIDTH)
                    h = max(2, round(f.height * w / f.width))
                    img = to_rgb(f, w, h)
                    quarter = round((f.rotation or 0) / 90) % 4
                    frames.append(np.rot90(img, k=quarter) if quarter else img)
                    got += 1
                    if target is not None or got >= n:
                        break
            except (av.FFmpegError, OSError, ValueError):
                continue
    return frames


def find_borders(source: str | bytes | IO[bytes], info: VideoInfo, spec: ClipSpec) -> Borders | None:
    """The source's black bars (None: not looked for, or nothing to tell them from); VideoError("borders") when
    they disqualify it."""
    if spec.borders == "off" or not isinstance(source, (str, bytes)):
        return None
    try:
        found = detect_borders(sample_frames(source, info), spec.border_black)
    except (av.FFmpegError, OSError, ValueError):
        return None  # the clip pass reports what is wrong with the file
    if found is None:
        return None
    b = found.significant(spec.border_min)
    if spec.borders == "reject" and b.area > 0:
        raise VideoError("borders", f"black bars {b.as_dict()} ({b.area:.0%} of the picture)")
    if spec.borders == "crop" and b.area > spec.border_max:
        raise VideoError("borders", f"black bars cover {b.area:.0%} of the picture > --border-max {spec.border_max}")
    return b


@contextmanager
def open_video(
    source: str | bytes | IO[bytes],
    spec: ClipSpec,
    shots: list[list[float]] | None = None,
    counts: dict[str, Any] | None = None,
) -> Iterator[tuple[VideoInfo, Iterator[Clip]]]:
    """Open and probe a source; yields (info, clips). Raises VideoError with a reason on bad input.

    `shots`: [[first frame's time, last frame's time], ...] in source seconds (TransNetV2's, see
    curate.shots): clips stay inside one of them. Clips rejected by a filter come with `rejected` set.
    `counts` (optional) receives "borders" (the bars' share of the picture, None if not measured) and, once
    the clips are read, "cuts" (shot changes seen).

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
        borders = find_borders(source, info, spec)
        counts = {} if counts is None else counts
        counts["borders"] = round(borders.area, 4) if borders is not None else None
        yield info, _clips(container, info, spec, shots, borders, counts)


def _clips(
    container: Any,
    info: VideoInfo,
    spec: ClipSpec,
    shots: list[list[float]] | None,
    borders: Borders | None,
    counts: dict[str, Any],
) -> Iterator[Clip]:
    cutter = _Cutter(spec, spec.planned_starts(info.duration), shots, borders)
    try:
        yield from _cut(container, info, spec, cutter)
    finally:
        counts["cuts"] = cutter.cuts


def _cut(container: Any, info: VideoInfo, spec: ClipSpec, cutter: _Cutter) -> Iterator[Clip]:
    stream = container.streams.video[0]
    tb = Fraction(stream.time_base) if stream.time_base else None
    src_fps = fps_fraction(info.fps) if info.fps else spec.fps
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
                cutter.setup(frame, int(round((frame.rotation or 0) / 90.0) * 90) % 360)
            if prev_t is not None and t <= prev_t:
                continue  # a repeated/out-of-order timestamp (broken muxers): keep time moving forward
            while True:
                g = t0 + Fraction(k) / spec.fps
                if g > t:
                    break
                # nearest source frame to the target time; ties go to the earlier one
                earlier = prev is not None and g - prev_t <= t - g
                yield from cutter.push(k, prev if earlier else frame, prev_t if earlier else t)
                k += 1
                if cutter.done:
                    return
            prev, prev_t = frame, t
            if cutter.next_start + cutter.min_len > last_useful:
                stopped = True
                break
        if prev is not None and not stopped:
            # the stream ended: the last source frame is shown for one frame period
            t_end = prev_t + 1 / src_fps
            while t0 + Fraction(k) / spec.fps < t_end and not cutter.done:
                yield from cutter.push(k, prev, prev_t)
                k += 1
        yield from cutter.finish()
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
