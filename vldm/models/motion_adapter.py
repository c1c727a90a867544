"""Interchange with AnimateDiff: export to / import from diffusers' `MotionAdapter` format.

Only the attention-only variant (`temporal_block=animatediff`, `res_blocks=false`, no extra inputs)
can be exported exactly: the MotionAdapter format holds no 3D convs, no merge factor and no temporal
text cross-attention (reference §4). Our layer computes x + (1 - a) * proj_out(h); diffusers computes
x + proj_out(h), so (1 - a) is folded into `proj_out` on export and divided out on import.

    adapter = export_motion_adapter(model)            # MotionAdapter; .save_pretrained(dir) for sharing
    unet3d = to_unet_motion_model(model)              # UNetMotionModel for AnimateDiffPipeline
    import_motion_adapter(model, MotionAdapter.from_pretrained(dir))   # AnimateDiff weights as init
"""

from __future__ import annotations

import re

import torch
from diffusers import MotionAdapter, UNetMotionModel

from vldm.models.motion_module import MotionModule, motion_module_sites

_NAME = re.compile(r"^(down|up)(\d+)_(?:attn|res)(\d+)$|^mid_attn(\d+)$")


def _adapter_prefix(name: str) -> str:
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name} is not a motion-module position")
    if m.group(4) is not None:
        return f"mid_block.motion_modules.{m.group(4)}."
    return f"{m.group(1)}_blocks.{m.group(2)}.motion_modules.{m.group(3)}."


def _check_exportable(model) -> None:
    o = model.opts
    if o.temporal_block != "animatediff":
        raise ValueError(
            "only temporal_block=animatediff models can be exported to a MotionAdapter "
            "(the paper's 3D convs, merge factors in the wrong place and text cross-attention have no slot)"
        )
    extra = list(model.conditioning.keys())
    extra += [k for k in model.temporal.keys() if not isinstance(model.temporal[k], MotionModule)]
    if extra:
        raise ValueError(f"temporal inputs {extra} have no MotionAdapter equivalent")
    heads = {m.heads for m in model.temporal.values()}
    if len(heads) != 1:
        raise ValueError(f"MotionAdapter needs one head count per level; got {heads}")


def adapter_config(model, max_seq_length: int = 32) -> dict:
    """MotionAdapter constructor arguments matching `model`'s image UNet and motion modules."""
    cfg = model.unet.config
    lpb = cfg.layers_per_block
    return dict(
        block_out_channels=tuple(cfg.block_out_channels),
        motion_layers_per_block=lpb if isinstance(lpb, int) else tuple(lpb),
        motion_transformer_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_transformer_layers_per_mid_block=1,
        motion_num_attention_heads=model.opts.motion_num_attention_heads,
        motion_norm_num_groups=cfg.norm_num_groups,
        motion_max_seq_length=max_seq_length,
        use_motion_mid_block=any(n.startswith("mid_") for n, _, _ in motion_module_sites(model.unet)),
    )


@torch.no_grad()
def export_motion_adapter(model, max_seq_length: int = 32) -> MotionAdapter:
    """A diffusers MotionAdapter holding `model`'s temporal layers, (1 - a) folded into proj_out.

    `max_seq_length` bounds the frames diffusers can run (its position table is precomputed).
    """
    _check_exportable(model)
    adapter = MotionAdapter(**adapter_config(model, max_seq_length))
    sd = dict(adapter.state_dict())  # keeps diffusers' own `pos_embed.pe` buffers
    for name, layer in model.temporal.items():
        prefix = _adapter_prefix(name)
        keep = 1.0 - torch.sigmoid(layer.merge.mix_factor.float()).item()
        for k, v in layer.state_dict().items():
            if k.startswith("merge."):
                continue
            if k.startswith("proj_out."):
                v = v.float() * keep
            sd[prefix + k] = v.to(sd[prefix + k].dtype) if prefix + k in sd else v
    missing = set(adapter.state_dict()) - set(sd)
    if missing:
        raise RuntimeError(f"export left adapter weights unset: {sorted(missing)[:5]}")
    adapter.load_state_dict(sd, strict=True)
    return adapter


def to_unet_motion_model(model, max_seq_length: int = 32) -> UNetMotionModel:
    """diffusers UNetMotionModel = `model`'s image UNet + exported motion modules (AnimateDiffPipeline's unet)."""
    adapter = export_motion_adapter(model, max_seq_length)
    return UNetMotionModel.from_unet2d(model.unet, adapter).to(model.device).eval()


@torch.no_grad()
def import_motion_adapter(model, adapter: MotionAdapter) -> None:
    """Initialise `model`'s motion modules from an AnimateDiff MotionAdapter (inverse of the export).

    The merge factors keep their current value a; proj_out is divided by (1 - a), so the model then
    computes exactly what AnimateDiff does on video batches.
    """
    if model.opts.temporal_block != "animatediff":
        raise ValueError("import needs a temporal_block=animatediff model (same layout as the adapter)")
    src = adapter.state_dict()
    for name, layer in model.temporal.items():
        if not isinstance(layer, MotionModule):
            continue
        prefix = _adapter_prefix(name)
        keep = 1.0 - torch.sigmoid(layer.merge.mix_factor.float()).item()
        if keep <= 1e-6:
            raise ValueError(f"{name}: merge factor a = 1 leaves no room for the temporal path")
        new = {}
        for k, v in layer.state_dict().items():
            if k.startswith("merge."):
                new[k] = v
                continue
            if prefix + k not in src:
                raise KeyError(f"adapter has no {prefix + k}: layouts differ (heads, layers per block?)")
            w = src[prefix + k].float()
            new[k] = (w / keep if k.startswith("proj_out.") else w).to(v.dtype)
        layer.load_state_dict(new, strict=True)
