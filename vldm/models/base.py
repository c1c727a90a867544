"""The frozen image LDM: load it from a local diffusers directory, or build a tiny one.

A base model directory has the Stable Diffusion layout: `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`. Real checkpoints (SD-1.5, SD-2.1) and the tiny models built for tests
and the demo go through the same loading code: `load_components(model_cfg)`. Nothing is fetched
from a hub: paths must exist locally.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from vldm.config.core import to_dict
from vldm.config.model import ModelConfig, UNetSpec

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class Components:
    """What a video model is built from. vae / text encoder are None for latent-only models."""

    unet2d: UNet2DConditionModel
    vae: AutoencoderKL | None = None
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    scheduler_config: dict = field(default_factory=lambda: dict(SD_SCHEDULER))
    source: str = ""

    @property
    def latent_channels(self) -> int:
        # out_channels: an upscaler UNet (SD x4) takes latents + low-res channels in, latents out
        return self.unet2d.config.out_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_dim(self) -> int:
        return self.unet2d.config.cross_attention_dim


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str) -> None:
    """Refuse a weights file whose content is not the one the config names."""
    if expected:
        got = sha256_file(path)
        if got != expected.lower():
            raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {got}")


def _sub(root: Path, name: str) -> Path | None:
    p = root / name
    return p if p.is_dir() else None


def load_components(cfg: ModelConfig, load_vae: bool = True, load_text: bool = True) -> Components:
    """Load (or build, when `cfg.pretrained` is empty) the frozen image LDM's parts, all in eval mode."""
    if not cfg.pretrained:
        torch.manual_seed(0)  # a from-scratch UNet must be reproducible across ranks
        return Components(unet2d=UNet2DConditionModel(**cfg.unet.diffusers_kwargs()).eval(), source="scratch")
    root = Path(cfg.pretrained).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model.pretrained: {root} is not a local directory (nothing is downloaded)")
    if _sub(root, "unet") is not None:
        unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", local_files_only=True).eval()
    else:
        # a directory with only an autoencoder (and text encoder): an image UNet trained from scratch
        # on top of it (stage=image, e.g. the driving model), built from model.unet
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg.unet.diffusers_kwargs()).eval()
    comps = Components(unet2d=unet, source=str(root))
    if load_vae and _sub(root, "vae"):
        comps.vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", local_files_only=True).eval()
    if load_text and _sub(root, "text_encoder") and _sub(root, "tokenizer"):
        from transformers import AutoTokenizer, CLIPTextModel

        comps.text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).eval()
        comps.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.exists():
        comps.scheduler_config = {k: v for k, v in json.loads(sched.read_text()).items() if not k.startswith("_")}
    for m in (comps.unet2d, comps.vae, comps.text_encoder):
        if m is not None:
            m.requires_grad_(False)
    return comps


def build_video_unet(cfg: ModelConfig, comps: Components):
    """VideoLDMUNet on the loaded image UNet, temporal layers from `cfg.temporal_weights` if given.

    The runtime options of `cfg.temporal` (attention backend, checkpointing) are not applied: they are the
    training run's (a run trained with flash-attn samples on CPU); the trainer sets them itself.
    """
    from vldm.models.video_unet import VideoLDMUNet, architecture_options

    model = VideoLDMUNet.from_unet2d(comps.unet2d, **architecture_options(to_dict(cfg.temporal)))
    if cfg.temporal_weights:
        model.load_temporal(cfg.temporal_weights)
    return model


@torch.no_grad()
def encode_text(
    comps: Components, captions: list[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(B, L, D) text embeddings; without a text encoder, a fixed zero context of length 1."""
    if comps.text_encoder is None or comps.tokenizer is None:
        return torch.zeros(len(captions), 1, comps.text_dim, device=device, dtype=dtype or torch.float32)
    tok = comps.tokenizer(
        list(captions),
        padding="max_length",
        max_length=comps.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    enc = comps.text_encoder.to(device)
    out = enc(tok.input_ids.to(device))[0]
    return out.to(dtype) if dtype is not None else out


# ---------------------------------------------------------------------------- tiny models
TINY_WORDS = (
    "a an the and to of in on moving up down left right red green blue yellow white black orange "
    "purple cyan magenta square circle triangle shape shapes two one small large slowly quickly "
    "bouncing ball car day night"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, others to shifted code points
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_tokenizer(out_dir: str | Path, words: tuple[str, ...] = TINY_WORDS, max_length: int = 24) -> Path:
    """A real CLIP BPE tokenizer with a tiny vocabulary: every byte, plus merges that spell `words`.

    Unknown words still tokenize (into characters), so any caption works.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            pair = (cur, p)
            if pair not in merges:
                merges.append(pair)
            cur = cur + p
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(out))
    return out


def build_tiny_base(
    out_dir: str | Path,
    unet: UNetSpec | None = None,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    text_dim: int | None = None,
    seed: int = 0,
    with_text: bool = True,
    with_vae: bool = True,
) -> Path:
    """Write a tiny random image LDM in the Stable Diffusion directory layout (for tests and the demo).

    The VAE downsamples by 2**(len(vae_channels)-1); the UNet's latent channels match the VAE's.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    spec = unet or UNetSpec()
    if text_dim is not None:
        spec = UNetSpec(**{**to_dict(spec), "cross_attention_dim": text_dim})
    UNet2DConditionModel(**spec.diffusers_kwargs()).save_pretrained(str(out / "unet"))
    if with_vae:
        n = len(vae_channels)
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=spec.in_channels,
            block_out_channels=tuple(vae_channels),
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=1.0,
        ).save_pretrained(str(out / "vae"))
    if with_text:
        tok_dir = build_tiny_tokenizer(out / "tokenizer")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=spec.cross_attention_dim,
                intermediate_size=spec.cross_attention_dim * 2,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        ).save_pretrained(str(out / "text_encoder"))
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(str(out / "scheduler"))
    return out
