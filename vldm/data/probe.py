"""Probe an opened video with PyAV: streams, duration, frame rate, size, rotation (no decoding)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any


@dataclass
class VideoInfo:
    codec: str
    width: int  # as stored (before rotation)
    height: int
    fps: float | None  # average frame rate, None when the container does not say
    duration: float | None  # seconds, None when unknown
    frames: int | None  # frame count from the header (often 0/None: not trusted)
    rotation: int  # display rotation in degrees, counter-clockwise (set once a frame is decoded)
    has_audio: bool
    format: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) once turned upright."""
        return (self.width, self.height) if self.rotation % 180 == 90 else (self.height, self.width)


def _rate(stream: Any) -> Fraction | None:
    for name in ("average_rate", "guessed_rate", "base_rate"):
        r = getattr(stream, name, None)
        if r and r > 0:
            return Fraction(r)
    return None


def probe(container: Any) -> VideoInfo:
    """VideoInfo of the first video stream; raises LookupError if there is none."""
    if not container.streams.video:
        raise LookupError("no video stream")
    s = container.streams.video[0]
    rate = _rate(s)
    duration = None
    if s.duration is not None and s.time_base is not None:
        duration = float(s.duration * s.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    return VideoInfo(
        codec=s.codec_context.name,
        width=s.codec_context.width,
        height=s.codec_context.height,
        fps=float(rate) if rate else None,
        duration=duration if duration and duration > 0 else None,
        frames=s.frames or None,
        rotation=0,  # filled from the first decoded frame: PyAV exposes the display matrix there
        has_audio=bool(container.streams.audio),
        format=container.format.name,
    )
