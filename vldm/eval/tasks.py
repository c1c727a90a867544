"""Units of work of the eval pool and their partial results.

A `ShardTask` is a slice [start, stop) of one of three sets:
- "samples":   sample indices of a checkpoint's weight variant (generate, write mp4s, features);
- "val_loss":  held-out clips of a checkpoint's weight variant (validation diffusion loss);
- "reference": real videos, for one metric's reference statistics (FVD or FID).
Each writes one partial file atomically; a task whose partial exists (for the same checkpoint
weights) is done, so a killed worker's shard is simply planned again and a rerun skips finished work.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vldm.config.eval import EvalSuite
from vldm.eval.layout import SHARDS, VARIANT_FILES, step_dir, weights_fingerprint
from vldm.eval.suite import PROTOCOL_VERSION
from vldm.io import atomic_write_bytes


@dataclass(frozen=True)
class ShardTask:
    kind: str  # "samples" | "val_loss" | "reference"
    key: str  # checkpoint directory name (step_00000100) or reference hash
    start: int
    stop: int
    out: str  # partial file this task writes
    variant: str = ""  # "ema" | "raw" (checkpoint tasks)
    metric: str = ""  # "fvd" | "fid" (reference tasks)
    ckpt: str = ""  # checkpoint directory (checkpoint tasks)
    step: int = -1
    fingerprint: tuple = field(default=())

    @property
    def name(self) -> str:
        what = f"{self.variant}_{self.kind}" if self.variant else f"{self.metric}_{self.kind}"
        return f"{self.key}/{what}_{self.start:06d}-{self.stop:06d}"

    @property
    def weights_key(self) -> str:
        """Which temporal weights a worker must hold for this task ("" = none)."""
        return f"{self.ckpt}:{self.variant}" if self.ckpt else ""

    def sort_key(self) -> tuple:
        # reference statistics first (every checkpoint needs them), then newest checkpoint first,
        # variants together (a worker keeps its loaded weights), then shard order
        return (0 if self.kind == "reference" else 1, -self.step, self.variant, self.kind, self.start)


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def checkpoint_tasks(run_dir: str | Path, suite: EvalSuite, suite_hash: str, ckpt: Path, step: int) -> list[ShardTask]:
    """Every shard of one checkpoint (done or not). Variants whose weights file is missing are skipped
    (e.g. `temporal_ema.safetensors` of a run without EMA); none at all is an error."""
    variants = [v for v in suite.sampling.variants if (ckpt / VARIANT_FILES[v]).exists()]
    if not variants:
        raise FileNotFoundError(f"{ckpt}: none of {[VARIANT_FILES[v] for v in suite.sampling.variants]} exists")
    shards = step_dir(run_dir, suite_hash, ckpt.name) / SHARDS
    size = suite.pool.shard_size
    out = []
    for v in variants:
        fp = tuple(weights_fingerprint(ckpt, v))
        jobs = [("samples", suite.sampling.num_samples)]
        if suite.val_loss.enabled:
            jobs.append(("val_loss", suite.val_loss.num_clips))
        for kind, n in jobs:
            for a, b in _ranges(n, size):
                out.append(
                    ShardTask(
                        kind,
                        ckpt.name,
                        a,
                        b,
                        str(shards / f"{v}_{kind}_{a:06d}-{b:06d}.npz"),
                        variant=v,
                        ckpt=str(ckpt),
                        step=step,
                        fingerprint=fp,
                    )
                )
    return out


def reference_key(suite: EvalSuite, proto: dict, metric: str) -> str:
    """Hash of everything the real-data statistics of `metric` depend on (not the fake-sample settings).
    `proto` is `protocol(suite)` (computed once: it hashes the weight files)."""
    sec = proto[metric]
    body = {"version": PROTOCOL_VERSION, "metric": metric, "settings": sec, "real": proto["real"]}
    if metric == "fid":
        # per-frame FID reads real clips with as many frames as generated videos have
        body["frames_per_clip"] = suite.fid.num_frames or "sampled"
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def reference_tasks(suite: EvalSuite, metric: str, cache_dir: Path, key: str, num_real: int) -> list[ShardTask]:
    shards = cache_dir / key / SHARDS
    return [
        ShardTask("reference", key, a, b, str(shards / f"{metric}_{a:06d}-{b:06d}.npz"), metric=metric)
        for a, b in _ranges(num_real, max(suite.pool.shard_size, 16))
    ]


# ------------------------------------------------------------------ partial files
def write_partial(task: ShardTask, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """One npz with the task (for validation), free-form meta and the arrays; atomic."""
    buf = io.BytesIO()
    info = {"task": asdict(task), **meta}
    np.savez(buf, __meta__=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
    atomic_write_bytes(task.out, buf.getvalue())


def read_partial(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path) as z:
        meta = json.loads(z["__meta__"].tobytes().decode())
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    return meta, arrays


def read_meta(path: str | Path) -> dict:
    with np.load(path) as z:  # npz members load lazily: only the meta is read
        return json.loads(z["__meta__"].tobytes().decode())


def partial_done(task: ShardTask) -> bool:
    """The task's partial exists and was computed from the same checkpoint weights."""
    p = Path(task.out)
    if not p.exists():
        return False
    try:
        meta = read_meta(p)
    except Exception:  # noqa: BLE001 - an unreadable partial is redone, never trusted
        return False
    return list(meta["task"].get("fingerprint", [])) == list(task.fingerprint)
