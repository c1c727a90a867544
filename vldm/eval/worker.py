"""Runs shard tasks in one process (a Ray actor, or the local executor): no Ray or W&B in here.

The frozen base model is loaded once per worker; a checkpoint's temporal weights (raw or EMA) are
loaded when a task needs a different set than the one held. Feature networks load on first use.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vldm.checkpoint import RUN_CONFIG
from vldm.config import Config, build_config
from vldm.config.eval import EvalSuite
from vldm.eval.frechet import FeatureStats
from vldm.eval.layout import VARIANT_FILES, VIDEOS, step_dir
from vldm.eval.suite import prompts, resolve, sample_spec
from vldm.eval.tasks import ShardTask, write_partial
from vldm.eval.video_metrics import (
    frame_consistency,
    from_uint8,
    noise_seed,
    quantize_uint8,
    temporal_flicker,
    validation_loss,
)
from vldm.io import to_uint8, write_mp4

GRID_SAMPLES = 16  # first frames kept per variant for the W&B grid
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _stats_bytes(st: FeatureStats | None) -> np.ndarray:
    return np.frombuffer(st.to_bytes(), dtype=np.uint8) if st is not None else np.zeros(0, np.uint8)


def _center_crop_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(b, 3, f, h, w) -> shorter side to `size` (bilinear, antialiased), centre crop to size x size."""
    b, c, f, h, w = frames.shape
    x = frames.transpose(1, 2).reshape(b * f, c, h, w)
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return x.reshape(b, f, c, size, size).transpose(1, 2)


class EvalWorker:
    def __init__(
        self, run_dir: str | Path, suite: EvalSuite, suite_hash: str, device: str = "auto", threads: int | None = None
    ):
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.run_dir = Path(run_dir).resolve()
        self.suite, self.suite_hash = suite, suite_hash
        self.run_cfg = build_config(Config, [str(self.run_dir / RUN_CONFIG)])
        if self.run_cfg.stage != "temporal":
            raise ValueError(
                f"{self.run_dir}: the eval pool evaluates video (stage=temporal) runs, this one is "
                f"stage={self.run_cfg.stage}"
            )
        self.resolved = resolve(suite, self.run_cfg)
        self.device = pick_device(suite.pool.device)
        self.dtype = DTYPES[suite.sampling.dtype]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError(f"sampling.dtype={suite.sampling.dtype} needs a GPU; this worker runs on the CPU")
        self.prompts = prompts(suite)
        self._comps = None
        self._model = None
        self._loaded: tuple | None = None  # (weights path, fingerprint) held by the model
        self._extractors: dict[str, object] = {}
        self._real: dict[str, list] = {}

    # ------------------------------------------------------------------ lazily built parts
    def _ensure_model(self):
        if self._model is None:
            from vldm.models.base import build_video_unet, load_components

            self._comps = load_components(self.run_cfg.model)
            for m in (self._comps.vae, self._comps.text_encoder):
                if m is not None:
                    m.to(self.device)
            model = build_video_unet(self.run_cfg.model, self._comps).to(self.device).eval()
            # diffusers warns on any dtype cast through .to(); only cast when sampling is not fp32
            self._model = model.to(dtype=self.dtype) if self.dtype != torch.float32 else model
        return self._model

    def _load_weights(self, task: ShardTask) -> None:
        model = self._ensure_model()
        path = Path(task.ckpt) / VARIANT_FILES[task.variant]
        key = (str(path), tuple(task.fingerprint))
        if self._loaded != key:
            model.load_temporal(path)  # copies into the existing parameters: device and dtype are kept
            self._loaded = key

    def extractor(self, name: str):
        if name not in self._extractors:
            from vldm.eval.extractors import CLIPExtractor, I3DExtractor, InceptionExtractor

            s, bs = self.suite, self.suite.pool.feature_batch_size
            if name == "i3d":
                self._extractors[name] = I3DExtractor(
                    s.fvd.weights, s.fvd.sha256, s.fvd.num_frames, s.fvd.stride, s.fvd.resize, self.device, bs
                )
            elif name == "inception":
                self._extractors[name] = InceptionExtractor(
                    s.fid.weights, s.fid.sha256, s.fid.resize, self.device, bs * 8
                )
            elif name == "clip":
                self._extractors[name] = CLIPExtractor(s.clipsim.model_dir, s.clipsim.sha256, self.device, bs * 8)
            else:
                raise KeyError(name)
        return self._extractors[name]

    def _refs(self, spec: str, limit: int) -> list:
        from vldm.eval.videoio import list_videos

        if spec not in self._real:
            self._real[spec] = list_videos(spec, limit)
        return self._real[spec]

    # ------------------------------------------------------------------ entry point
    def stale_temp_files(self, task: ShardTask) -> list[Path]:
        """Temp files an earlier attempt of `task` leaves when its worker is killed mid-write: the partial's
        (`.NAME.*.tmp`, atomic_write_bytes) and, for samples, its videos' (`.NNNNNN.mp4.tmp.mp4`, write_mp4).
        Only this task writes these names, so removing them before it runs again races with nobody."""
        out = Path(task.out)
        found = sorted(out.parent.glob(f".{out.name}.*.tmp"))
        if task.kind == "samples":
            vdir = step_dir(self.run_dir, self.suite_hash, task.key) / VIDEOS / task.variant
            found += [p for i in range(task.start, task.stop) if (p := vdir / f".{i:06d}.mp4.tmp.mp4").exists()]
        return found

    def run(self, task: ShardTask) -> dict:
        """Compute one shard and write its partial file. Returns a small summary."""
        for p in self.stale_temp_files(task):  # a retry after a SIGKILLed attempt: nothing half-written stays
            p.unlink(missing_ok=True)
        t0 = time.time()
        if task.kind == "samples":
            arrays, meta = self._samples(task)
        elif task.kind == "val_loss":
            arrays, meta = self._val_loss(task)
        elif task.kind == "reference":
            arrays, meta = self._reference(task)
        else:
            raise ValueError(f"unknown task kind {task.kind!r}")
        meta.update(wall_s=time.time() - t0, host=socket.gethostname(), pid=os.getpid(), device=str(self.device))
        write_partial(task, arrays, meta)
        return {"task": task.name, "wall_s": meta["wall_s"], "pid": os.getpid()}

    # ------------------------------------------------------------------ samples
    def _conditioning(self, specs: list[dict]) -> tuple[dict, dict]:
        """(model_kwargs, uncond_model_kwargs) for class labels and an fps condition, when the model has them."""
        opts = self._model.opts
        kw, ukw = {}, {}
        if opts.num_class_labels:
            no_label = opts.num_class_labels  # the extra row: "no label", used for guidance
            labels = [s["label"] if s["label"] is not None else no_label for s in specs]
            kw["class_labels"] = torch.tensor(labels, device=self.device)
            ukw["class_labels"] = torch.full_like(kw["class_labels"], no_label)
        elif any(s["label"] is not None for s in specs):
            raise ValueError(
                "sampling.class_labels given but the model has no class conditioning (temporal.num_class_labels=0)"
            )
        conds = {}
        for name in opts.scalar_conds:
            if name != "fps":
                raise ValueError(f"the eval pool cannot supply the model's {name!r} condition (only fps)")
            conds["fps"] = torch.full((len(specs),), float(self.suite.sampling.fps), device=self.device)
        if conds:
            kw["conditions"], ukw["conditions"] = conds, dict(conds)
        return kw, ukw

    @torch.no_grad()
    def _generate(self, specs: list[dict]) -> torch.Tensor:
        """(b, 3, f, H, W) videos in [-1, 1], quantised to 8 bits, for the given sample specs."""
        from vldm.diffusion import Conditioning, decode_latents, denoise, latent_channels, scheduler_config
        from vldm.models.base import encode_text

        model, comps, s, r = self._ensure_model(), self._comps, self.suite.sampling, self.resolved
        vsf = comps.vae_scale_factor
        if r.height % vsf or r.width % vsf:
            raise ValueError(f"sample size {r.height}x{r.width} is not divisible by the VAE factor {vsf}")
        ctx = encode_text(comps, [x["prompt"] for x in specs], self.device, self.dtype)
        kw, ukw = self._conditioning(specs)
        guided = s.guidance_scale != 1
        no_text = None
        if guided:  # the unconditional branch: the negative prompt, the "no label" class
            neg = encode_text(comps, [s.negative_prompt] * len(specs), self.device, self.dtype)
            no_text = {"encoder_hidden_states": neg, **ukw}  # ukw: the class / condition keys of kw, unconditional
        # the same loop and guidance as the sampler's cascade (vldm.diffusion.sampler)
        latents = denoise(
            model,
            (latent_channels(model), r.num_frames, r.height // vsf, r.width // vsf),
            [x["seed"] for x in specs],
            scheduler_config(self.run_cfg.diffusion, comps.scheduler_config),
            Conditioning({"encoder_hidden_states": ctx, **kw}, no_text=no_text, text_scale=s.guidance_scale),
            steps=s.steps,
            sampler=s.sampler,
            device=self.device,
            dtype=self.dtype,
        )
        videos = decode_latents(comps.vae, latents).float().cpu()
        if comps.vae is None:  # latent-only model: show the first 3 latent channels
            videos = videos[:, :3]
        return quantize_uint8(videos)  # what the mp4 holds, and what real videos look like after decoding

    def _samples(self, task: ShardTask) -> tuple[dict, dict]:
        self._load_weights(task)
        suite = self.suite
        specs = [sample_spec(suite, i, self.prompts) for i in range(task.start, task.stop)]
        vdir = step_dir(self.run_dir, self.suite_hash, task.key) / VIDEOS / task.variant
        per_sample: dict[str, list] = {"flicker": [], "consistency": [], "clipsim": []}
        stats: dict[str, FeatureStats | None] = {"fvd": None, "fid": None}
        first_frames = []
        for b in range(0, len(specs), suite.pool.batch_size):
            batch = specs[b : b + suite.pool.batch_size]
            videos = self._generate(batch)
            frames_u8 = to_uint8(videos).numpy()
            for spec, fr in zip(batch, frames_u8):
                if suite.pool.save_videos or spec["index"] < suite.wandb.log_videos:
                    write_mp4(vdir / f"{spec['index']:06d}.mp4", fr, fps=suite.sampling.fps)
                if spec["index"] < GRID_SAMPLES:
                    first_frames.append(fr[0])
            if suite.video.flicker:
                per_sample["flicker"].append(temporal_flicker(videos))
            if suite.video.consistency:
                feats = self.extractor("clip").image_embeds if suite.video.consistency_features == "clip" else None
                per_sample["consistency"].append(frame_consistency(videos, feats, suite.video.consistency_size))
            if suite.clipsim.enabled:
                per_sample["clipsim"].append(
                    self.extractor("clip").clipsim(videos, [x["prompt"] for x in batch], suite.clipsim.num_frames)
                )
            if suite.fvd.enabled:
                f = self.extractor("i3d")(videos)
                stats["fvd"] = (stats["fvd"] or FeatureStats(f.shape[1])).update(f)
            if suite.fid.enabled:
                f = self.extractor("inception")(videos, self.resolved.fid_frames)
                stats["fid"] = (stats["fid"] or FeatureStats(f.shape[1])).update(f)
        arrays = {
            "indices": np.array([x["index"] for x in specs]),
            "seeds": np.array([x["seed"] for x in specs], dtype=np.int64),
        }
        for k, v in per_sample.items():
            if v:
                arrays[k] = torch.cat(v).numpy()
        for k, st in stats.items():
            if st is not None:
                arrays[f"{k}_stats"] = _stats_bytes(st)
        if first_frames:
            arrays["first_frames"] = np.stack(first_frames)
        meta = {"n": len(specs)}
        for name in ("i3d", "inception", "clip"):
            if name in self._extractors:
                meta[f"{name}_protocol"] = self._extractors[name].protocol()
        return arrays, meta

    # ------------------------------------------------------------------ validation loss
    def _val_latents(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        from vldm.diffusion import encode_pixels
        from vldm.eval.videoio import read_clip

        comps, v, r = self._comps, self.suite.val_loss, self.resolved
        vsf = comps.vae_scale_factor
        if not v.data:  # synthetic held-out set: N(0, 1) latents, fixed by (seed, index)
            shape = (comps.latent_channels, r.val_frames, r.val_size // vsf, r.val_size // vsf)
            lat = torch.stack(
                [
                    torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(v.seed, i, -1)))
                    for i in indices
                ]
            )
            return lat.to(self.device, self.dtype), [""] * len(indices)
        refs = self._refs(v.data, v.num_clips)
        clips, captions = [], []
        for i in indices:
            frames, caption = read_clip(refs[i], r.val_frames, v.stride)
            clips.append(_center_crop_resize(from_uint8(torch.from_numpy(frames)), r.val_size))
            captions.append(caption)
        pixels = torch.cat(clips).clamp(-1, 1)
        if comps.vae is None:
            raise ValueError("val_loss.data needs a model with a VAE (this run's base model has none)")
        lat = encode_pixels(comps.vae, pixels.to(self.device, comps.vae.dtype))
        return lat.to(self.device, self.dtype), captions

    @torch.no_grad()
    def _val_loss(self, task: ShardTask) -> tuple[dict, dict]:
        from vldm.diffusion import make_scheduler, scheduler_config
        from vldm.models.base import encode_text

        self._load_weights(task)
        model, comps, v = self._model, self._comps, self.suite.val_loss
        indices = list(range(task.start, task.stop))
        latents, captions = self._val_latents(indices)
        ctx = encode_text(comps, captions, self.device, self.dtype)
        sched = make_scheduler(scheduler_config(self.run_cfg.diffusion, comps.scheduler_config), "ddpm")
        kw, _ = self._conditioning([{"label": None}] * len(indices))
        losses = validation_loss(lambda x, t: model(x, t, ctx, **kw), latents, indices, sched, v.timesteps, v.seed)
        return {"indices": np.array(indices), "val_loss": losses.numpy()}, {"n": len(indices)}

    # ------------------------------------------------------------------ real-data reference statistics
    def _reference(self, task: ShardTask) -> tuple[dict, dict]:
        from vldm.eval.extractors import resize_frames
        from vldm.eval.videoio import read_clip

        suite = self.suite
        refs = self._refs(suite.real.videos, suite.real.num_videos)
        if task.metric == "fvd":
            ext, frames, stride = self.extractor("i3d"), suite.fvd.num_frames, suite.fvd.stride
        else:
            ext, frames, stride = self.extractor("inception"), self.resolved.fid_frames, 1
        stats, skipped, batch = None, [], []

        def flush() -> FeatureStats | None:
            videos = torch.cat(batch)
            batch.clear()
            f = ext(videos) if task.metric == "fvd" else ext(videos, frames)
            return (stats or FeatureStats(f.shape[1])).update(f)

        for ref in refs[task.start : task.stop]:
            try:
                # consecutive frames: the extractor takes every stride-th, exactly as for generated videos
                clip, _ = read_clip(ref, (frames - 1) * stride + 1)
            except Exception as e:  # noqa: BLE001 - a corrupt or short video is skipped and counted, not fatal
                skipped.append({"video": ref.key, "error": "".join(traceback.format_exception_only(e)).strip()})
                continue
            # real videos differ in size: resize before batching (the extractor's own resize is then a no-op)
            batch.append(resize_frames(from_uint8(torch.from_numpy(clip)), ext.resize))
            if len(batch) >= suite.pool.feature_batch_size:
                stats = flush()
        if batch:
            stats = flush()
        arrays = {"stats": _stats_bytes(stats)}
        return arrays, {"n": stats.count if stats else 0, "skipped": skipped, "extractor": ext.protocol()}
