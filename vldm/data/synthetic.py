"""The embedded default corpus: one or two solid shapes moving at constant velocity on a plain background.

Each video comes with its caption ("a red square moving up and to the left") and the true trajectory
(centre of every shape in every frame, in pixels) in a sidecar JSON. Everything is a function of
(seed, index): the same seed gives the same files, byte for byte (x264 runs in its exact mode).
Shapes bounce off the borders (reflection), so their speed is constant; the caption names the
initial direction.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vldm.config.core import ConfigError
from vldm.config.data import SyntheticConfig, parse_size
from vldm.io import atomic_write_bytes, encode_frames

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "cyan": (40, 210, 220),
    "magenta": (215, 50, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
# colours no default corpus draws (they are not in PALETTE, so the default draws stay as they were): a concept a
# model trained on the default corpus never saw, for `--colors pink` (personalisation, docs/paper.md)
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (255, 150, 190)}  # >= 104 from every PALETTE colour
ALL_COLOURS = {**PALETTE, **NEW_COLOURS}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (90, 90, 90), "navy": (10, 20, 60)}
SHAPES = ("square", "circle", "triangle")
# 8 directions, counter-clockwise from "right"; image y grows downwards so "up" is -y
DIRECTIONS = (
    "right",
    "up and to the right",
    "up",
    "up and to the left",
    "left",
    "down and to the left",
    "down",
    "down and to the right",
)
_SS = 4  # supersampling per axis: anti-aliased edges, which codecs (and PSNR) like


@dataclass
class Track:
    shape: str
    color: str
    radius: float  # half extent in pixels
    velocity: tuple[float, float]  # initial (vx, vy) in pixels per frame
    direction: str
    positions: np.ndarray  # (F, 2) centre (x, y) per frame
    bounces: list[int]

    def as_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "rgb": list(ALL_COLOURS[self.color]),
            "radius": round(self.radius, 4),
            "velocity": [round(v, 6) for v in self.velocity],
            "direction": self.direction,
            "trajectory": [[round(float(x), 4), round(float(y), 4)] for x, y in self.positions],
            "bounces": self.bounces,
        }


def simulate(
    x: float, y: float, vx: float, vy: float, r: float, width: int, height: int, frames: int
) -> tuple[np.ndarray, list[int]]:
    """Constant-velocity motion reflected at the borders: the shape stays fully inside the frame."""
    pos = np.zeros((frames, 2))
    bounces = []
    for i in range(frames):
        pos[i] = x, y
        x, y = x + vx, y + vy
        hit = False
        if x < r or x > width - r:
            x = 2 * r - x if x < r else 2 * (width - r) - x
            vx, hit = -vx, True
        if y < r or y > height - r:
            y = 2 * r - y if y < r else 2 * (height - r) - y
            vy, hit = -vy, True
        if hit and i + 1 < frames:
            bounces.append(i + 1)
    return pos, bounces


def _coverage(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage (0..1) of a shape inside its pixel bounding box."""
    y0, y1 = max(0, int(math.floor(cy - r)) - 1), min(height, int(math.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(math.floor(cx - r)) - 1), min(width, int(math.ceil(cx + r)) + 1)
    ys = y0 + (np.arange((y1 - y0) * _SS) + 0.5) / _SS
    xs = x0 + (np.arange((x1 - x0) * _SS) + 0.5) / _SS
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    if shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    else:  # triangle pointing up: apex (0, -r), base corners (+-r, r)
        inside = (dy <= r) & (2 * np.abs(dx) <= (dy + r))
    cov = inside.reshape(y1 - y0, _SS, x1 - x0, _SS).mean(axis=(1, 3))
    return slice(y0, y1), slice(x0, x1), cov


def panning_texture(rng: np.random.Generator, amplitude: float, frames: int, height: int, width: int) -> np.ndarray:
    """(F, H, W, 1) float32 texture of mean `amplitude` (so a black background keeps it) moving at a
    constant 1-2 px per frame: coarse blobs plus fine grain, roughly the detail (and so the bitrate and
    decode cost) of handheld camera footage, and per-frame grain."""
    vx, vy = (int(v) * int(s) for v, s in zip(rng.integers(1, 3, size=2), rng.choice([-1, 1], size=2)))
    th, tw = height + abs(vy) * frames + 8, width + abs(vx) * frames + 8
    coarse = rng.normal(size=(th // 8 + 2, tw // 8 + 2)).astype(np.float32)
    coarse = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:th, :tw]
    for axis in (0, 1):  # box blur of the 8x8 blocks: smooth blobs, not tiles
        coarse = sum(np.roll(coarse, k, axis=axis) for k in range(-4, 4)) / 8
    tex = amplitude * (
        1.0 + 0.8 * coarse / max(float(coarse.std()), 1e-6) + 0.35 * rng.normal(size=(th, tw)).astype(np.float32)
    )
    y0, x0 = (abs(vy) * frames + 4 if vy < 0 else 4), (abs(vx) * frames + 4 if vx < 0 else 4)
    moving = np.stack(
        [tex[y0 + vy * i : y0 + vy * i + height, x0 + vx * i : x0 + vx * i + width] for i in range(frames)]
    )
    # sensor-like grain, fresh every frame: what motion compensation cannot predict (without it x264 codes
    # a rigid integer-pixel pan almost for free)
    grain = rng.normal(scale=0.12 * amplitude, size=moving.shape).astype(np.float32)
    return (moving + grain)[..., None]


def render(
    tracks: list[Track], background: tuple[int, int, int], height: int, width: int, texture: np.ndarray | None = None
) -> np.ndarray:
    """(F, H, W, 3) uint8 frames; later tracks are drawn over earlier ones (shapes stay solid)."""
    frames = len(tracks[0].positions)
    out = np.empty((frames, height, width, 3), np.float32)
    out[:] = np.asarray(background, np.float32)
    if texture is not None:
        out += texture
    for t in tracks:
        rgb = np.asarray(ALL_COLOURS[t.color], np.float32)
        for i, (cx, cy) in enumerate(t.positions):
            sy, sx, cov = _coverage(t.shape, cx, cy, t.radius, height, width)
            region = out[i, sy, sx]
            out[i, sy, sx] = region + (rgb - region) * cov[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def caption(tracks: list[Track]) -> str:
    return " and ".join(
        f"{'an' if t.color[0] in 'aeiou' else 'a'} {t.color} {t.shape} moving {t.direction}" for t in tracks
    )


def colour_names(cfg: SyntheticConfig) -> list[str]:
    """The colours to draw from (cfg.colors, default the PALETTE: the same draw as before the option). Checked
    here, not in the config (which imports nothing of vldm): the first video fails before anything is written."""
    unknown = [c for c in cfg.color_names() if c not in ALL_COLOURS]
    if unknown:
        raise ConfigError(f"colors: unknown {unknown} (known: {', '.join(ALL_COLOURS)})")
    return cfg.color_names() or list(PALETTE)


def make_video(cfg: SyntheticConfig, index: int) -> tuple[np.ndarray, dict]:
    """Frames and sidecar of video `index`: a pure function of (cfg, index)."""
    height, width = parse_size(cfg.size)
    rng = np.random.default_rng([cfg.seed, index])
    n = 1 if cfg.max_shapes == 1 else int(rng.integers(1, 3))
    names = colour_names(cfg)
    colors = rng.choice(len(names), size=min(n, len(names)), replace=False)
    n = len(colors)
    short = min(height, width)
    if cfg.background == "random":
        bg_name, bg = "random", tuple(int(v) for v in rng.integers(0, 60, size=3))
    else:
        bg_name, bg = cfg.background, BACKGROUNDS[cfg.background]
    tracks = []
    for j in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = cfg.shape_size * short / 2 * float(rng.uniform(0.8, 1.2))
        d = int(rng.integers(len(DIRECTIONS)))
        # +-10 degrees of jitter keeps the caption's direction word true
        angle = math.radians(45 * d + float(rng.uniform(-10, 10)))
        speed = short * float(rng.uniform(cfg.min_speed, cfg.max_speed))
        vx, vy = speed * math.cos(angle), -speed * math.sin(angle)
        x, y = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
        pos, bounces = simulate(x, y, vx, vy, r, width, height, cfg.frames)
        tracks.append(Track(shape, names[int(colors[j])], r, (vx, vy), DIRECTIONS[d], pos, bounces))
    # drawn from its own stream: texture=0 leaves every other random draw (and file) as it was
    tex = (
        panning_texture(np.random.default_rng([cfg.seed, index, 1]), cfg.texture, cfg.frames, height, width)
        if cfg.texture
        else None
    )
    frames = render(tracks, bg, height, width, tex)
    side = {
        "caption": caption(tracks),
        "index": index,
        "seed": cfg.seed,
        "fps": cfg.fps,
        "frames": cfg.frames,
        "height": height,
        "width": width,
        "background": bg_name,
        "background_rgb": list(bg),
        "shapes": [t.as_dict() for t in tracks],
    }
    return frames, side


def write_corpus(cfg: SyntheticConfig, log_every: int = 0) -> list[Path]:
    """Write cfg.count videos + sidecars into cfg.output; returns the video paths.

    The sidecar is written first and each file is renamed into place, so a video that exists always
    has its caption (the sharder may list the directory while this runs)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cfg.count):
        frames, side = make_video(cfg, i)
        path = out / f"{cfg.prefix}_{i:05d}.{cfg.container}"
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(side).encode())
        atomic_write_bytes(
            path, encode_frames(frames, cfg.fps, codec=cfg.codec, container=cfg.container, crf=cfg.crf, exact=True)
        )
        paths.append(path)
        if log_every and (i + 1) % log_every == 0:
            print(f"[make_synthetic] {i + 1}/{cfg.count} videos", flush=True)
    return paths


def set_rotation(mp4: bytes, degrees: int) -> bytes:
    """Write a display rotation into an mp4's track header, as phones do for portrait video (90 =
    shown turned 90 degrees clockwise). For test corpora: PyAV cannot write the display matrix."""
    i = mp4.find(b"tkhd")
    version = mp4[i + 4]
    # tkhd: version/flags, times + track id + reserved + duration (20 or 32 bytes), reserved (8),
    # layer/group/volume/reserved (8), then the 3x3 matrix (9 x int32)
    off = i + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    c, s = {0: (1, 0), 90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees % 360]
    m = (c << 16, s << 16, 0, -s << 16, c << 16, 0, 0, 0, 1 << 30)
    return mp4[:off] + struct.pack(">9i", *m) + mp4[off + 36 :]


def audio_only(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """An AAC-in-mp4 file with no video stream."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = (np.sin(np.arange(int(seconds * rate)) / 8.0) * 0.3).astype(np.float32)[None]
        for k in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, k : k + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return buf.getvalue()


def write_test_corpus(directory: str | Path, seed: int = 0, seconds: float = 1.0) -> dict[str, str]:
    """A corpus of awkward and broken inputs for tests and benchmarks: {file name: expected outcome},
    "ok" for files that must give clips (at 8 fps, 8 frames), else the failure reason (format.REASONS).
    Each good file lasts `seconds` and shows a moving shape; names exercise shell metacharacters."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    base = SyntheticConfig(output=str(out), seed=seed, max_shapes=1)

    def clip(i: int, size: str, fps: float) -> np.ndarray:
        cfg = dataclasses.replace(base, size=size, fps=fps, frames=max(1, round(seconds * fps)))
        return make_video(cfg, i)[0]

    files: dict[str, tuple[bytes, str]] = {
        "h264 plain.mp4": (encode_frames(clip(0, "32", 16), 16), "ok"),
        "hevc.mp4": (encode_frames(clip(1, "32", 16), 16, codec="libx265"), "ok"),
        "vp9.webm": (encode_frames(clip(2, "32", 16), 16, codec="libvpx-vp9", container="webm"), "ok"),
        "mjpeg.avi": (encode_frames(clip(3, "32", 16), 16, codec="mjpeg", container="avi"), "ok"),
        "ffv1.mkv": (encode_frames(clip(4, "32", 16), 16, codec="ffv1", container="mkv"), "ok"),
        "av1.mp4": (encode_frames(clip(18, "64", 16), 16, codec="libsvtav1", crf=None, preset=None), "ok"),
        "odd size 61x97.mp4": (
            encode_frames(clip(5, "62x98", 16)[:, :61, :97].copy(), 16, codec="ffv1", container="mkv"),
            "ok",
        ),
        "portrait.mp4": (encode_frames(clip(6, "64x32", 16), 16), "ok"),
        "rotated phone.mp4": (set_rotation(encode_frames(clip(7, "32x48", 16), 16), 90), "ok"),
        "sixty fps.mp4": (encode_frames(clip(8, "32", 60), 60), "ok"),
        "ntsc 29.97.mp4": (encode_frames(clip(9, "32", 30000 / 1001), 30000 / 1001), "ok"),
        "eight fps.mp4": (encode_frames(clip(10, "32", 8), 8), "ok"),
        'it\'s a "quote".mp4': (encode_frames(clip(11, "32", 16), 16), "ok"),
        "$(touch PWNED) `touch PWNED2`; rm -rf x.mp4": (encode_frames(clip(12, "32", 16), 16), "ok"),
        "vidéo 日本語 ü.mp4": (encode_frames(clip(13, "32", 16), 16), "ok"),
        "pipe:1 concat:a|b %d.mp4": (encode_frames(clip(14, "32", 16), 16), "ok"),
        "empty.mp4": (b"", "empty"),
        "text renamed.mp4": (b"this is not a video, just some text\n" * 20, "unreadable"),
        "random bytes.mp4": (
            np.random.default_rng(seed).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
            "unreadable",
        ),
        "audio only.mp4": (audio_only(seconds), "no_video"),
        "too short.mp4": (encode_frames(clip(15, "32", 16)[:4], 16), "too_short"),
        "playlist.mp4": (f"#EXTM3U\n#EXTINF:1,\nfile://{out}/h264 plain.mp4\n#EXT-X-ENDLIST\n".encode(), "unreadable"),
        "concat list.mp4": (f"ffconcat version 1.0\nfile '{out}/h264 plain.mp4'\n".encode(), "unreadable"),
    }
    # truncated: an mp4 cut in the middle (its index is at the end, so nothing is decodable)
    whole = encode_frames(clip(16, "32", 16), 16)
    files["truncated.mp4"] = (whole[: len(whole) // 2], "unreadable")
    # a truncated stream format (matroska) decodes up to the cut: too little of it for a clip
    whole = encode_frames(clip(17, "32", 16), 16, codec="ffv1", container="mkv")
    files["truncated stream.mkv"] = (whole[: int(len(whole) * 0.4)], "decode_error")
    for name, (data, _) in files.items():
        atomic_write_bytes(out / (name if "." in name[-5:] else name + ".mp4"), data)
    return {(n if "." in n[-5:] else n + ".mp4"): e for n, (_, e) in files.items()}
