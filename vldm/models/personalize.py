"""Personalised text-to-video (paper §4.2): trained temporal layers on a fine-tuned image model.

The temporal layers learned on SD go, unchanged, onto any UNet of the same shape (a DreamBooth or
otherwise fine-tuned SD, optionally with a LoRA fused into it first). At sampling the spatial layers use
the fine-tuned model's text encoder (its new tokens) and the temporal layers the original one, through
`VideoLDMUNet.forward(temporal_encoder_hidden_states=...)`: the temporal layers were trained on that
encoder's embedding space.

    video_unet = personalize("runs/sd15_t2v", "models/dreambooth_dog", lora="style.safetensors")

LoRA files: diffusers/PEFT (`...lora_A.weight` / `lora_B.weight`, with a `unet.` or PEFT's
`base_model.model.` prefix), diffusers attention processors (`...processor.to_q_lora.down.weight`) and
kohya (`lora_unet_..._lora_down.weight`, with `.alpha`); only UNet entries are used (a LoRA's
text-encoder part belongs to the spatial text encoder, fuse it there). A PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, what `PeftModel.save_pretrained` writes) is fused
with its own scaling: `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), per module
`rank_pattern` / `alpha_pattern` applied.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from vldm.checkpoint import COMPLETE, latest_checkpoint
from vldm.models.video_unet import CONFIG_NAME, VideoLDMUNet

# PEFT's save_pretrained prefixes keys with base_model.model. (the PeftModel wrapper); diffusers with unet.
_PREFIX = r"^(?:base_model\.model\.)?(?:unet\.)?"
_PEFT = re.compile(_PREFIX + r"(?P<mod>.+)\.lora_(?P<kind>A|B)(?:\.default)?\.weight$")
_PROC = re.compile(
    _PREFIX + r"(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$"
)
_KOHYA = re.compile(r"^lora_unet_(?P<mod>.+)\.(?P<kind>lora_down|lora_up)\.weight$")


PEFT_CONFIG = "adapter_config.json"


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        cands = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if not cands:
            raise FileNotFoundError(f"no LoRA weights in {p}")
        p = cands[0]
    return p


def load_lora(path: str | Path) -> dict[str, torch.Tensor]:
    p = _weights_file(path)
    return load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu", weights_only=True)


def load_peft_config(path: str | Path) -> dict | None:
    """The adapter_config.json of a PEFT adapter (the directory, or beside the weights file), else None."""
    p = Path(path)
    cfg = p / PEFT_CONFIG if p.is_dir() else p.parent / PEFT_CONFIG
    if not cfg.is_file():
        return None
    out = json.loads(cfg.read_text())
    if out.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg}: peft_type {out['peft_type']!r} is not a LoRA")
    if out.get("use_dora"):
        raise ValueError(f"{cfg}: DoRA adapters (use_dora) cannot be fused as W + scale * B @ A")
    for key in ("r", "lora_alpha"):
        if not isinstance(out.get(key), (int, float)):
            raise ValueError(f"{cfg}: {key!r} missing or not a number")
    return out


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends with it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return float(value)
    return float(default)


def peft_alpha(config: dict, module: str, rank: int) -> float:
    """The alpha that makes fuse_lora's alpha / rank equal PEFT's scaling for `module`."""
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    if int(r) != rank:
        raise ValueError(f"LoRA for {module}: rank {rank} in the weights, r = {int(r)} in {PEFT_CONFIG}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scaling * rank


def _pairs(sd: dict[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"down", "up", "alpha"?} for every UNet LoRA pair in `sd`."""
    kohya_names = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith(("text_encoder", "lora_te")):
            continue
        if m := _PEFT.match(k):
            out.setdefault(m["mod"], {})["down" if m["kind"] == "A" else "up"] = v
        elif m := _PROC.match(k):
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            out.setdefault(f"{m['mod']}.{proj}", {})[m["kind"]] = v
        elif m := _KOHYA.match(k):
            mod = kohya_names.get(m["mod"])
            if mod is None:
                raise KeyError(f"LoRA key {k}: no UNet module {m['mod']}")
            out.setdefault(mod, {})["down" if m["kind"] == "lora_down" else "up"] = v
            alpha = sd.get(f"lora_unet_{m['mod']}.alpha")
            if alpha is not None:
                out[mod]["alpha"] = alpha
    return out


@torch.no_grad()
def fuse_lora(
    unet: UNet2DConditionModel,
    lora: dict[str, torch.Tensor] | str | Path,
    scale: float = 1.0,
    peft_config: dict | None = None,
) -> list[str]:
    """Add scale * (alpha / rank) * up @ down to each targeted weight of `unet` in place; returns the modules
    changed. alpha: the kohya `.alpha` entry, else the PEFT adapter config's (`peft_config`, or the
    adapter_config.json of the directory `lora`), else alpha = rank."""
    if isinstance(lora, (str, Path)):
        peft_config = peft_config or load_peft_config(lora)
        sd = load_lora(lora)
    else:
        sd = lora
    modules = dict(unet.named_modules())
    changed = []
    for name, pair in _pairs(sd, unet).items():
        if "down" not in pair or "up" not in pair:
            raise ValueError(f"LoRA for {name} lacks its down or up matrix")
        if name not in modules:
            raise KeyError(f"LoRA targets {name}, which this UNet does not have")
        w = modules[name].weight
        down, up = pair["down"].float(), pair["up"].float()
        rank = down.shape[0]
        if "alpha" in pair:
            alpha = float(pair["alpha"])
        elif peft_config is not None:
            alpha = peft_alpha(peft_config, name, rank)
        else:
            alpha = float(rank)
        factor = scale * alpha / rank
        delta = up.flatten(1) @ down.flatten(1)  # linear, 1x1 and kxk convs alike
        w.add_((factor * delta).reshape(w.shape).to(w.dtype))
        changed.append(name)
    if not changed:
        raise ValueError("no UNet LoRA weights found (unsupported format?)")
    return changed


def _temporal_dir(path: Path) -> Path:
    """A directory holding temporal.safetensors + temporal_config.json: itself, a checkpoint, or a run's newest
    checkpoint."""
    if (path / CONFIG_NAME).exists():
        return path
    ck = path if (path / COMPLETE).exists() else latest_checkpoint(path)
    if ck is None or not (ck / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path}: no temporal weights (temporal_config.json) in it or its checkpoints")
    return ck


def load_image_unet(path: str | Path) -> UNet2DConditionModel:
    p = Path(path)
    sub = "unet" if (p / "unet").is_dir() else None
    return (
        UNet2DConditionModel.from_pretrained(str(p), subfolder=sub, local_files_only=True).eval().requires_grad_(False)
    )


def personalize(
    temporal: VideoLDMUNet | str | Path,
    unet: UNet2DConditionModel | str | Path,
    lora: dict[str, torch.Tensor] | str | Path | None = None,
    lora_scale: float = 1.0,
) -> VideoLDMUNet:
    """A VideoLDMUNet on `unet` (a fine-tuned image UNet, model dir or its unet/) with the temporal layers
    of `temporal` (a model, a temporal-weights directory, a checkpoint or a run directory).

    The image UNet must have the shape the temporal layers were trained on (checked). With `lora`, the
    LoRA is fused into the UNet's weights first (scaled by `lora_scale`).
    """
    image_unet = load_image_unet(unet) if isinstance(unet, (str, Path)) else unet
    if lora is not None:
        fuse_lora(image_unet, lora, lora_scale)
    if isinstance(temporal, VideoLDMUNet):
        model = VideoLDMUNet.from_unet2d(image_unet, temporal=temporal.opts)
        if model.temporal_config()["base_unet_shape"] != temporal.temporal_config()["base_unet_shape"]:
            raise ValueError("the fine-tuned UNet's shape differs from the one the temporal layers were trained on")
        model.load_temporal_state_dict(temporal.temporal_state_dict())
        return model.to(temporal.device).eval()
    return VideoLDMUNet.from_unet2d_and_temporal(image_unet, _temporal_dir(Path(temporal))).eval()
