"""Optional latent stage: add VAE latents (and text embeddings) to every sample of a complete shard.

Training on `{key}.latents.npy` skips decoding mp4 and running the VAE encoder (video training is
often decode-bound). Latents are the means of the VAE's posterior for every frame, shaped
(C, F, h, w), with `(mean - shift_factor) * scaling_factor` already applied (the model's input
scale); the sample json records scaling_factor/shift_factor so they can be decoded back.

`LatentEncoder` is a plain class (tests call it directly); the sharder runs it as a Ray actor pool,
one actor per GPU when the cluster has GPUs. A shard is rewritten under a temp name (all original
members plus the new ones) and renamed; then its done marker records the latents, so a rerun skips it.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vldm.data.codec import decode_all
from vldm.data.format import EXT_JSON, EXT_LATENTS, EXT_MP4, EXT_TEXT_EMB, EXT_TXT
from vldm.data.shards import done_path, read_done, tar_path
from vldm.data.tario import SampleWriter, iter_samples
from vldm.io import atomic_open, atomic_write_bytes


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


class LatentEncoder:
    """Loads a local diffusers AutoencoderKL (and optionally a transformers text encoder + tokenizer)
    once, then encodes shards."""

    def __init__(
        self,
        vae_path: str,
        text_encoder_path: str = "",
        batch_frames: int = 16,
        dtype: str = "float16",
        device: str = "auto",
    ):
        import torch
        from diffusers import AutoencoderKL

        self.torch = torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        # fp32 VAE: SD-family VAEs overflow in fp16 on some inputs; the stage is not the bottleneck
        self.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).to(self.device).eval()
        self.vae.requires_grad_(False)
        self.batch_frames = batch_frames
        self.out_dtype = np.dtype(dtype)
        cfg = self.vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else None
        self.tokenizer = self.text_encoder = None
        if text_encoder_path:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(text_encoder_path)
            arch = T5EncoderModel if AutoConfig.from_pretrained(text_encoder_path).model_type == "t5" else AutoModel
            self.text_encoder = arch.from_pretrained(text_encoder_path).to(self.device).eval()
            self.text_encoder.requires_grad_(False)
        self.record = {
            "vae": os.path.abspath(vae_path),
            "text_encoder": os.path.abspath(text_encoder_path) if text_encoder_path else "",
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_dist": "mean",
            "dtype": str(self.out_dtype),
        }

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """(F, H, W, 3) uint8 -> (C, F, h, w) scaled latents (float32)."""
        from einops import rearrange

        torch = self.torch
        x = (
            torch.from_numpy(rearrange(frames, "f h w c -> f c h w").copy()).to(self.device, torch.float32) / 127.5
            - 1.0
        )
        outs = []
        with torch.no_grad():
            for chunk in x.split(self.batch_frames):
                mean = self.vae.encode(chunk).latent_dist.mean
                if self.shift_factor is not None:
                    mean = mean - self.shift_factor
                outs.append(mean * self.scaling_factor)
        return rearrange(torch.cat(outs).float().cpu().numpy(), "f c h w -> c f h w")

    def encode_text(self, caption: str) -> np.ndarray:
        """caption -> (L, D) last hidden state, padded to the tokenizer's max length (SD convention)."""
        torch = self.torch
        max_len = min(int(self.tokenizer.model_max_length or 77), 512)
        tok = self.tokenizer([caption], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = self.text_encoder(input_ids=tok.input_ids.to(self.device)).last_hidden_state
        return h[0].float().cpu().numpy()

    def encode_shard(self, out_dir: str, name: str) -> dict[str, Any]:
        """Rewrite shard `name` with latents (replacing older ones) and record them in its done marker."""
        out = Path(out_dir)
        summary = read_done(out, name)
        if summary is None:
            raise FileNotFoundError(f"shard {name} is not complete")
        t = time.time()
        src = tar_path(out, name)
        with atomic_open(src) as f, open(src, "rb") as fin:  # the old tar stays readable until the rename
            writer = SampleWriter(f)
            for _, key, members in iter_samples(fin):
                writer.write(key, self._sample(members))
            writer.close()
        # the tar changed size: the done marker (its completeness check) must follow at once
        summary["bytes"] = src.stat().st_size
        summary["latents"] = {**self.record, "elapsed": round(time.time() - t, 3)}
        atomic_write_bytes(done_path(out, name), json.dumps(summary, ensure_ascii=False, indent=1).encode())
        return summary

    def _sample(self, members: dict[str, bytes]) -> dict[str, bytes]:
        meta = json.loads(members[EXT_JSON])
        z = self.encode_frames(decode_all(members[EXT_MP4], format="mp4"))
        new = {k: v for k, v in members.items() if k not in (EXT_LATENTS, EXT_TEXT_EMB)}
        new[EXT_LATENTS] = npy_bytes(z.astype(self.out_dtype))
        meta["latents"] = {**self.record, "shape": list(z.shape)}
        if self.text_encoder is not None:
            caption = members.get(EXT_TXT, b"").decode("utf-8", "replace")
            e = self.encode_text(caption)
            new[EXT_TEXT_EMB] = npy_bytes(e.astype(self.out_dtype))
            meta["text_embeds"] = {
                "text_encoder": self.record["text_encoder"],
                "shape": list(e.shape),
                "dtype": str(self.out_dtype),
            }
        else:
            meta.pop("text_embeds", None)
        new[EXT_JSON] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        return new


def needs_latents(summary: dict[str, Any] | None, vae: str, text_encoder: str) -> bool:
    """A complete shard lacks latents from this VAE / text encoder."""
    if summary is None:
        return False
    rec = summary.get("latents") or {}
    return rec.get("vae") != os.path.abspath(vae) or rec.get("text_encoder", "") != (
        os.path.abspath(text_encoder) if text_encoder else ""
    )
