"""One micro-batch to one loss: frozen encoders, the task's inputs, the diffusion objective.

Randomness that decides the loss (noise, timestep, caption and label dropout, image-mode rows) is drawn
per clip from a generator seeded by (seed, step, micro-step, global slot), where the global slot is
rank * per-rank batch + position. A clip therefore gets the same noise whichever rank holds it and
whether the run was interrupted: 1 rank x 4 clips and 2 ranks x 2 clips compute the same loss, and a
resumed run continues the uninterrupted trajectory without restoring any generator.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange, repeat

from vldm.config.schema import Config
from vldm.diffusion import diffusion_loss, encode_pixels, make_scheduler, scheduler_config
from vldm.models.base import encode_text
from vldm.train.build import Built
from vldm.train.sources import seed_of

ENCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# batch keys that may carry precomputed text embeddings (b, L, D)
TEXT_EMB_KEYS = ("text_embeds", "text_embeddings", "encoder_hidden_states")


def _dotted(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


class Objective:
    def __init__(self, cfg: Config, built: Built, device: torch.device):
        self.cfg, self.built, self.device = cfg, built, device
        comps = built.comps
        self.scheduler = make_scheduler(scheduler_config(cfg.diffusion, comps.scheduler_config), "ddpm")
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        enc = cfg.train.encoder_dtype
        self.encoder_dtype = (
            ENCODER_DTYPES[enc] if enc != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        )
        for m in (comps.vae, comps.text_encoder):
            if m is not None:
                m.to(device=device, dtype=self.encoder_dtype).eval().requires_grad_(False)
        self.image_stage = cfg.stage == "image"
        # "no label" index: the extra embedding row (temporal), or the image UNet's last class row
        self.num_labels = (
            built.model_cfg.temporal.num_class_labels
            if not self.image_stage
            else max(0, (comps.unet2d.config.num_class_embeds or 0) - 1)
        )
        self.unet_null_label = (comps.unet2d.config.num_class_embeds or 0) - 1
        self.class_index = {name: i for i, name in enumerate(cfg.diffusion.class_names)}
        self.missing_labels = 0
        self._null_ctx: torch.Tensor | None = None

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """(b, c, f, h, w) float32 latents on the device: from the shards, or VAE-encoded pixels (means,
        like the shards' precomputed latents, so both paths train the same model)."""
        if "latents" in batch:
            return torch.as_tensor(batch["latents"]).to(self.device, torch.float32)
        vae = self.built.comps.vae
        if vae is None and self.cfg.model.pixel_space:
            # a pixel-space model: its "latents" are the clip's pixels in [-1, 1]
            pixels = torch.as_tensor(batch["pixels"]).to(self.device, non_blocking=True)
            return (pixels.float() / 127.5 - 1.0) if pixels.dtype == torch.uint8 else pixels.float()
        if vae is None:
            raise RuntimeError(
                "batch has pixels but the base model has no vae/ (set data.use_latents=true for latent shards)"
            )
        pixels = torch.as_tensor(batch["pixels"]).to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:  # data.pixel_dtype=uint8: 4x less host memory and copy; scaled here
            pixels = pixels.float() / 127.5 - 1.0
        return encode_pixels(vae, pixels).float()

    @torch.no_grad()
    def context(self, captions: list[str], drop: torch.Tensor, batch: dict) -> torch.Tensor:
        comps = self.built.comps
        pre = next((batch[k] for k in TEXT_EMB_KEYS if k in batch), None)
        if pre is not None:
            ctx = torch.as_tensor(pre).to(self.device, torch.float32)
            if drop.any():
                ctx[drop.to(ctx.device)] = self.null_context(ctx.shape[1:]).to(ctx.dtype)
        else:
            texts = ["" if d else c for c, d in zip(captions, drop.tolist())]
            ctx = encode_text(comps, texts, self.device, torch.float32)
        return ctx

    def null_context(self, shape: torch.Size) -> torch.Tensor:
        if self._null_ctx is None:
            comps = self.built.comps
            if comps.text_encoder is not None:
                self._null_ctx = encode_text(comps, [""], self.device, torch.float32)[0]
            else:
                self._null_ctx = torch.zeros(shape, device=self.device)
        return self._null_ctx

    def labels(self, meta: list[dict]) -> torch.Tensor | None:
        key = self.cfg.diffusion.label_key
        if not key:
            return None
        out = []
        for m in meta:
            v = _dotted(m, key)
            if isinstance(v, str) and v in self.class_index:
                v = self.class_index[v]
            if not isinstance(v, int) or not 0 <= v < self.num_labels:
                # a clip without a usable label trains as "no label" (counted, logged): never fatal
                self.missing_labels += 1
                v = self.num_labels
            out.append(v)
        return torch.tensor(out, dtype=torch.long)

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch: dict, step: int, micro: int, rank: int) -> tuple[torch.Tensor, int]:
        """Mean loss of this rank's micro-batch and the number of clips (images in stage=image) in it."""
        cfg = self.cfg
        z = self.latents(batch)
        captions = list(batch["captions"])
        meta = list(batch.get("meta") or [{} for _ in captions])
        if self.image_stage:
            # every frame is one training image with its own noise and timestep
            f = z.shape[2]
            z = rearrange(z, "b c f h w -> (b f) c 1 h w")
            captions = [c for c in captions for _ in range(f)]
            meta = [m for m in meta for _ in range(f)]
        n = z.shape[0]
        labels = self.labels(meta)
        task_batch = self.task_batch(batch, labels)
        if cfg.model.pixel_space:
            task_batch["latents"] = z  # the pixels in [-1, 1] (what the upsample task reads with pixels_key: latents)
        batch_gen = torch.Generator().manual_seed(seed_of("task", cfg.seed, step, micro, rank))
        inputs = self.built.task.training_inputs(z, task_batch, batch_gen)
        target = inputs.target_latents if inputs.target_latents is not None else z

        # per-clip draws, in a fixed order (see the module docstring). The noise is drawn on the device by a
        # generator of the device seeded per clip (no host tensor of the clip's size, no copy); the few
        # scalars per clip come from a CPU generator of the same per-clip seed, the same on any device
        noise, t, drop_text, drop_label, image_rows = [], [], [], [], []
        for j in range(n):
            slot = rank * n + j
            g = torch.Generator().manual_seed(seed_of("clip", cfg.seed, step, micro, slot))
            g_noise = torch.Generator(device=self.device).manual_seed(seed_of("noise", cfg.seed, step, micro, slot))
            noise.append(torch.randn(target.shape[1:], generator=g_noise, device=self.device))
            t.append(int(torch.randint(self.scheduler.config.num_train_timesteps, (1,), generator=g)))
            u = torch.rand(3, generator=g)
            drop_text.append(bool(u[0] < cfg.diffusion.text_dropout))
            drop_label.append(bool(u[1] < cfg.diffusion.label_dropout))
            image_rows.append(bool(u[2] < cfg.train.image_ratio))
        noise_t = torch.stack(noise).to(target.dtype)
        timesteps = torch.tensor(t).to(self.device, non_blocking=True)
        # inputs in the dtype the model runs in (DeepSpeed casts it for bf16/fp16; the FLOP count runs it in fp32)
        dtype = next((getattr(model, "module", model)).parameters()).dtype
        ctx = self.context(captions, torch.tensor(drop_text), batch).to(dtype)

        kwargs: dict[str, Any] = dict(inputs.model_kwargs)
        if labels is not None and "class_labels" not in kwargs:
            drop = torch.tensor(drop_label)
            kwargs["class_labels"] = labels.masked_fill(drop, self.num_labels).to(self.device)
            if not self.image_stage and self.unet_null_label > 0 and "unet_class_labels" not in kwargs:
                # a class-conditional image model (driving): its spatial layers see the same label, dropped together
                kwargs["unet_class_labels"] = labels.masked_fill(drop, self.unet_null_label).to(self.device)
        if not self.image_stage and cfg.train.image_ratio > 0:
            kwargs["image_only_indicator"] = torch.tensor(image_rows, device=self.device)
        extra = inputs.extra_channels

        def model_fn(noisy: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            x = noisy if extra is None else torch.cat([noisy, extra.to(noisy.dtype)], 1)
            return self.forward(model, x.to(dtype), tt, ctx, kwargs)

        if inputs.loss_mask is None:
            per = diffusion_loss(
                model_fn,
                target,
                self.scheduler,
                weighting=cfg.diffusion.loss_weighting,
                snr_gamma=cfg.diffusion.snr_gamma,
                timesteps=timesteps,
                noise=noise_t,
                reduce=False,
            )
            return per.mean(), n
        # frames outside the mask predict their target exactly (zero error); the clip mean is rescaled
        # to the mean over counted frames
        if self.scheduler.config.prediction_type == "v_prediction":
            goal = self.scheduler.get_velocity(target, noise_t, timesteps)
        else:
            goal = noise_t
        m = inputs.loss_mask.to(self.device, target.dtype).expand(-1, 1, -1, 1, 1)

        def masked_fn(noisy: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            pred = model_fn(noisy, tt).float()
            return pred * m + goal * (1 - m)

        per = diffusion_loss(
            masked_fn,
            target,
            self.scheduler,
            weighting=cfg.diffusion.loss_weighting,
            snr_gamma=cfg.diffusion.snr_gamma,
            timesteps=timesteps,
            noise=noise_t,
            reduce=False,
        )
        return (per / m.flatten(1).mean(1).clamp(min=1e-8)).mean(), n

    def task_batch(self, batch: dict, labels: torch.Tensor | None = None) -> dict:
        """What the task sees: the batch, the class labels, and data.frame_stride (the clips' frames are
        every frame_stride-th stored frame, so a stored frame rate in their metadata is frame_stride
        times theirs: the interpolation task's fps condition divides by it)."""
        out = dict(batch)
        out.setdefault("frame_stride", self.cfg.data.frame_stride)
        if labels is not None:
            out["class_labels"] = labels
        return out

    def forward(self, model, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The model on (b, c, f, h, w) inputs: VideoLDMUNet as it is, the image UNet frame by frame."""
        if not self.image_stage:
            return model(x, t, ctx, **kwargs)
        f = x.shape[2]
        # the image UNet's own class embedding: the task's label for it (an upscaler's noise level, the
        # pixel-space upsampler of the driving model) or the clip's class label
        labels = kwargs.get("unet_class_labels", kwargs.get("class_labels"))
        out = model(
            rearrange(x, "b c f h w -> (b f) c h w"),
            repeat(t, "b -> (b f)", f=f),
            encoder_hidden_states=repeat(ctx, "b l d -> (b f) l d", f=f),
            class_labels=repeat(labels, "b -> (b f)", f=f) if labels is not None else None,
            return_dict=False,
        )[0]
        return rearrange(out, "(b f) c h w -> b c f h w", f=f)
