"""Checkpoints in the run-dir layout of `vldm.checkpoint` (read its docstring), and resume.

A save is collective (every rank calls it at the same step):
1. rank 0 creates `checkpoints/.tmp-step_N/`; every rank writes its ZeRO partition into `deepspeed/`
   with `exclude_frozen_parameters=True` (the frozen image UNet is never written);
2. the fp32 trainable weights and the EMA (sharded over the ZeRO partitions under bf16) are assembled
   (collective) and rank 0 writes the consolidated
   `temporal.safetensors` + `temporal_ema.safetensors` (stage=temporal, VideoLDMUNet.save_temporal format)
   or `unet/` + `unet_ema/` (stage=image), the resolved `config.yaml` and `trainer_state.json` (step,
   every rank's loader position and RNG states, counters);
3. rank 0 writes `COMPLETE` last, renames the directory to `step_N` and deletes all but the newest
   `checkpoint.keep_last` complete checkpoints. A crash at any point leaves either a complete
   checkpoint or a `.tmp-*` directory that readers ignore and the next save removes.

Resume (`checkpoint.resume`): `auto` = the newest complete checkpoint of run_dir (fresh start if none),
`never`, or a checkpoint directory. At the world size it was saved with, the DeepSpeed state is loaded:
model, ZeRO optimizer partitions and fp32 master weights, then EMA, step, data position and RNG, so
the loss trajectory continues exactly. At another world size ZeRO partitions do not fit: the
consolidated fp32 weights and EMA are loaded with a fresh optimizer state, and the log says so.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vldm.checkpoint import (
    CHECKPOINTS,
    COMPLETE,
    RUN_CONFIG,
    STEP_RE,
    TEMPORAL_EMA_WEIGHTS,
    TEMPORAL_WEIGHTS,
    TRAINER_STATE,
    UNET_DIR,
    UNET_EMA_DIR,
    checkpoint_step,
    complete_checkpoints,
    step_dir_name,
)
from vldm.config.core import dump_yaml
from vldm.config.schema import Config
from vldm.io import atomic_write_text
from vldm.train import dist
from vldm.train.build import Built
from vldm.train.ema import EMA

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "zero"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"  # a step_N found unusable at resume is renamed so: kept for a person, ignored by all


# ---------------------------------------------------------------------------- small helpers
def _b64(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def _unb64(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA, numpy, python), JSON-safe."""
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": _b64(np.random.get_state()),
        "python": _b64(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    np.random.set_state(_unb64(state["numpy"]))
    random.setstate(_unb64(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(_unb64(state["cuda"]))


def _jsonable(obj: Any) -> Any:
    """Loader states are usually plain JSON; anything else is kept, pickled, in a JSON string."""
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {"__pickle_b64__": _b64(obj)}


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"__pickle_b64__"}:
        return _unb64(obj["__pickle_b64__"])
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def full_fp32_weights(built: Built, keep: bool = True) -> dict[str, torch.Tensor]:
    """{name without prefix: fp32 host tensor} of the trainable weights. Under bf16/fp16 the fp32 master
    copy is assembled from the ZeRO partitions: a collective, so every rank calls this, but only the rank
    that writes them (`keep`, rank 0) copies them to host memory; the others drop each assembled tensor at
    once and get {} (8 ranks x the full fp32 weights per node otherwise: 2.6 GB each at SD-1.5 scale)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in built.trainable():
        full = safe_get_full_fp32_param(p) if p.dtype != torch.float32 and hasattr(p, "_hp_mapping") else None
        if not keep:
            del full
            continue
        t = full if full is not None else p.detach()
        out[name[len(built.prefix) :]] = t.float().cpu().contiguous()
    return out


def set_fp32_weights(built: Built, tensors: dict[str, torch.Tensor]) -> None:
    """Load fp32 trainable weights into the module and (under ZeRO) into the fp32 master partitions."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        for name, p in built.trainable():
            key = name[len(built.prefix) :]
            if key not in tensors:
                raise KeyError(f"consolidated weights have no entry for {key!r}")
            value = tensors[key].to(p.device, torch.float32)
            if hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, value)
            p.copy_(value.to(p.dtype))


# ---------------------------------------------------------------------------- resume plan
@dataclass
class ResumePlan:
    """What to resume from, decided before anything is built."""

    path: Path | None = None
    mode: str = "fresh"  # fresh | deepspeed | consolidated
    state: dict = field(default_factory=dict)
    message: str = "fresh start"
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints not usable, and why

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def checkpoint_problem(path: Path, stage: str) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from, or None. Cheap: safetensors headers
    are checked against the file sizes (a truncated file fails), nothing is loaded."""
    from safetensors import safe_open

    if not (path / COMPLETE).exists():
        return f"no {COMPLETE} marker"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        int(state["step"]), int(state["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{TRAINER_STATE} unreadable ({type(e).__name__}: {e})"
    files = (
        [path / d / UNET_WEIGHTS for d in (UNET_DIR, UNET_EMA_DIR)]
        if stage == "image"
        else [path / TEMPORAL_WEIGHTS, path / TEMPORAL_EMA_WEIGHTS]
    )
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            return f"{f.relative_to(path)} unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _newest_usable(run_dir: str | Path, stage: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest step_* directory that can be resumed from, and the newer ones that cannot (with why)."""
    root = Path(run_dir) / CHECKPOINTS
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)] if root.is_dir() else []
    skipped = []
    for p in sorted(dirs, key=checkpoint_step, reverse=True):
        why = checkpoint_problem(p, stage)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def plan_resume(cfg: Config, world_size: int) -> ResumePlan:
    r = cfg.checkpoint.resume
    if r == "never":
        return ResumePlan(message="fresh start (checkpoint.resume=never)")
    skipped: list[tuple[Path, str]] = []
    if r == "auto":
        path, skipped = _newest_usable(cfg.run_dir, cfg.stage)
        if path is None:
            if skipped:
                # starting fresh would silently throw away a run: a person has to decide
                raise RuntimeError(
                    f"no usable checkpoint in {Path(cfg.run_dir) / CHECKPOINTS}: "
                    + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                    + ". Repair or remove them, or set checkpoint.resume=never to start from scratch"
                )
            return ResumePlan(message=f"fresh start (no complete checkpoint in {Path(cfg.run_dir) / CHECKPOINTS})")
    else:
        path = Path(r)
        why = checkpoint_problem(path, cfg.stage)
        if why is not None:
            raise FileNotFoundError(f"checkpoint.resume: {path} cannot be resumed from: {why}")
    state = json.loads((path / TRAINER_STATE).read_text())
    saved_world = int(state["world_size"])
    has_ds = (path / DEEPSPEED_DIR).is_dir()
    note = (
        "; SKIPPED newer checkpoint(s): "
        + "; ".join(f"{p.name} ({why}), moved aside to {CORRUPT_PREFIX}{p.name}" for p, why in skipped)
        if skipped
        else ""
    )
    if saved_world == world_size and has_ds:
        return ResumePlan(
            path,
            "deepspeed",
            state,
            f"resuming from {path} (step {state['step']}): DeepSpeed state (model, ZeRO optimizer, fp32 masters), "
            "EMA, data position and RNG of every rank" + note,
            skipped,
        )
    why = (
        f"saved at world size {saved_world}, now {world_size}"
        if saved_world != world_size
        else "no DeepSpeed state in it"
    )
    return ResumePlan(
        path,
        "consolidated",
        state,
        f"resuming from {path} (step {state['step']}) with a FRESH optimizer state ({why}): consolidated fp32 "
        "weights and EMA, step and LR schedule restored; Adam moments restart from zero" + note,
        skipped,
    )


def _consolidated(path: Path, stage: str, ema: bool) -> dict[str, torch.Tensor]:
    if stage == "image":
        return load_file(str(path / (UNET_EMA_DIR if ema else UNET_DIR) / UNET_WEIGHTS))
    from vldm.models.video_unet import upgrade_temporal_state_dict

    # a format-1 checkpoint (flat temporal keys) resumes into the format-2 parameter names
    return upgrade_temporal_state_dict(load_file(str(path / (TEMPORAL_EMA_WEIGHTS if ema else TEMPORAL_WEIGHTS))))


def restore(plan: ResumePlan, cfg: Config, built: Built, engine, ema: EMA, source, world: dist.World) -> None:
    """Apply a resume plan to the built engine, EMA, data source and RNG (every rank)."""
    if plan.mode == "fresh":
        return
    st = plan.state
    if plan.mode == "deepspeed":
        load_path, _ = engine.load_checkpoint(
            str(plan.path / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {plan.path / DEEPSPEED_DIR}")
    else:
        set_fp32_weights(built, _consolidated(plan.path, cfg.stage, ema=False))
    if ema.enabled:
        ema.load_tensors(_consolidated(plan.path, cfg.stage, ema=True), strip_prefix=built.prefix)
        ema.num_updates = int(st.get("ema_updates", 0))
    same_world = int(st["world_size"]) == world.world_size
    loaders = st.get("loader") or []
    if loaders and hasattr(source, "load_state_dict"):
        # same world size: each rank continues exactly where it stopped. Otherwise the source gets rank
        # 0's state and decides: the synthetic source counts global samples and carries over exactly; the
        # shard loader logs the layout change and starts a fresh epoch order at the next epoch.
        source.load_state_dict(_from_jsonable(loaders[world.rank] if same_world else loaders[0]))
        if not same_world:
            dist.print0(
                f"data: world size changed ({st['world_size']} -> {world.world_size}); the data source was given rank "
                "0's position"
            )
    rngs = st.get("rng") or []
    if same_world and rngs:
        set_rng_state(rngs[world.rank])


# ---------------------------------------------------------------------------- save
def clean_partial_checkpoints(run_dir: str | Path) -> None:
    """Remove .tmp-* directories left by a save that was interrupted (rank 0, at start)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def fresh_checkpoint_dirs(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(temp dir, final dir) for the checkpoint of `step`; the temp dir is created empty."""
    final = Path(run_dir) / CHECKPOINTS / step_dir_name(step)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def publish_checkpoint(tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Mark `tmp` complete, rename it to `final` (replacing a save at the same step, e.g. a stop right
    after a periodic save) and drop all but the newest `keep_last` complete checkpoints."""
    atomic_write_text(tmp / COMPLETE, f"step {step}\n")
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    done = complete_checkpoints(final.parent.parent)
    for old in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointSaveError(OSError):
    """A save failed (full or read-only file system, ...); nothing was published."""


class Checkpointer:
    def __init__(self, cfg: Config, built: Built, world: dist.World):
        self.cfg, self.built, self.world = cfg, built, world
        self.root = Path(cfg.run_dir) / CHECKPOINTS
        self.last_saved_step = -1

    def clean_partial(self, skipped: list[tuple[Path, str]] = ()) -> None:
        """Rank 0, after every rank has restored: remove .tmp-* partials, and move the checkpoints the
        resume found unusable out of the step_* namespace (else readers would take them for the newest,
        and keep_last would delete good checkpoints before them)."""
        if self.world.is_main:
            clean_partial_checkpoints(self.cfg.run_dir)
            for p, _ in skipped:
                aside = p.with_name(f"{CORRUPT_PREFIX}{p.name}")
                shutil.rmtree(aside, ignore_errors=True)
                if p.exists():
                    os.replace(p, aside)

    def save(self, engine, ema: EMA, source, trainer_state: dict, reason: str) -> Path:
        """Write a complete checkpoint at trainer_state['step']; collective. Returns its directory."""
        step = int(trainer_state["step"])
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        t0 = time.perf_counter()
        try:
            return self._save(engine, ema, source, trainer_state, reason, step, tmp, final, t0)
        except (OSError, RuntimeError) as e:
            # a full or read-only file system (torch.save reports it as a RuntimeError): the partial stays
            # a .tmp-* that readers ignore (removed here when possible, to give the space back), so the
            # newest complete checkpoint is still the one resumed from; the error names what failed and where
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = complete_checkpoints(self.cfg.run_dir)
            detail = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            raise CheckpointSaveError(
                f"checkpoint save of step {step} failed on rank {self.world.rank} writing into {tmp} "
                f"({type(e).__name__}: {detail}); the previous complete checkpoint "
                f"{prev[-1] if prev else '(none)'} is intact and a restart resumes from it"
            ) from e

    def _save(self, engine, ema: EMA, source, trainer_state: dict, reason: str, step: int, tmp: Path, final: Path, t0):
        if self.world.is_main:
            fresh_checkpoint_dirs(self.cfg.run_dir, step)
        dist.barrier()
        loader_states = dist.all_gather_object(
            _jsonable(source.state_dict()) if hasattr(source, "state_dict") else None
        )
        rng_states = dist.all_gather_object(rng_state())
        if self.cfg.checkpoint.save_optimizer:
            engine.save_checkpoint(
                str(tmp / DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                client_state={"step": step},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        weights = full_fp32_weights(self.built, keep=self.world.is_main)  # collective under bf16/fp16
        # without EMA, the "EMA" file holds the raw weights: readers can always ask for it
        ema_weights = ema.full_tensors(self.built.prefix, keep=self.world.is_main) if ema.enabled else weights
        if self.world.is_main:
            self._write_weights(tmp, weights, ema_weights)
            # the model section with the task's temporal options merged: enough to rebuild the model
            dump_yaml(dataclasses.replace(self.cfg, model=self.built.model_cfg), tmp / RUN_CONFIG)
            state = {
                **trainer_state,
                "world_size": self.world.world_size,
                "reason": reason,
                "saved_at": time.time(),
                "ema_updates": ema.num_updates,
                "loader": loader_states,
                "rng": rng_states,
                "deepspeed": DEEPSPEED_DIR if self.cfg.checkpoint.save_optimizer else None,
            }
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(state, indent=1))
            publish_checkpoint(tmp, final, step, self.cfg.checkpoint.keep_last)
        dist.barrier()
        self.last_saved_step = step
        self.last_save_s = time.perf_counter() - t0
        return final

    def _write_weights(self, tmp: Path, weights: dict[str, torch.Tensor], ema_weights: dict[str, torch.Tensor]) -> None:
        model = self.built.model
        if self.cfg.stage == "image":
            for sub, sd in ((UNET_DIR, weights), (UNET_EMA_DIR, ema_weights)):
                (tmp / sub).mkdir()
                model.save_config(str(tmp / sub))
                save_file(sd, str(tmp / sub / UNET_WEIGHTS), metadata={"format": "pt"})
            return
        model.save_temporal(tmp, state_dict=weights)
        save_file(
            {k: v.cpu().contiguous() for k, v in ema_weights.items()},
            str(tmp / TEMPORAL_EMA_WEIGHTS),
            metadata={"format": "pt"},
        )
