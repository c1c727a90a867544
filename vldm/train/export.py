"""Turn an image-stage checkpoint into a base model directory for the temporal stage.

    python -m vldm.train.export RUN_OR_CHECKPOINT OUT [--raw] [--vae DIR]

OUT gets the diffusers layout `load_components` reads: unet/ (the EMA weights, or the raw ones with
--raw), and vae/, text_encoder/, tokenizer/, scheduler/ copied from the run's `model.pretrained` (or
--vae for the autoencoder); without a scheduler there, one is written from the run's diffusion config.
The driving recipe: configs/driving_image.yaml -> export -> configs/driving_temporal.yaml.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vldm.checkpoint import COMPLETE, RUN_CONFIG, UNET_DIR, UNET_EMA_DIR, latest_checkpoint


def export(source: str | Path, out: str | Path, raw: bool = False, vae: str | Path | None = None) -> Path:
    from vldm.config import Config, build_config
    from vldm.diffusion import make_scheduler, scheduler_config

    src = Path(source)
    ckpt = src if (src / COMPLETE).exists() else latest_checkpoint(src)
    if ckpt is None:
        raise FileNotFoundError(f"{src} is neither a complete checkpoint nor a run directory with one")
    if not (ckpt / UNET_DIR).is_dir():
        raise ValueError(f"{ckpt} has no {UNET_DIR}/: only stage=image checkpoints hold a whole UNet")
    cfg = build_config(Config, [str(ckpt / RUN_CONFIG)])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(ckpt / (UNET_DIR if raw else UNET_EMA_DIR), tmp / "unet")
    base = Path(cfg.model.pretrained) if cfg.model.pretrained else None
    parts = {"vae": Path(vae) if vae else (base / "vae" if base else None)}
    for name in ("text_encoder", "tokenizer", "scheduler"):
        parts[name] = base / name if base else None
    for name, path in parts.items():
        if path is not None and path.is_dir():
            shutil.copytree(path, tmp / name)
    if not (tmp / "scheduler").exists():
        make_scheduler(scheduler_config(cfg.diffusion, None), "ddim").save_pretrained(str(tmp / "scheduler"))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "source", help="an image-stage run directory (newest complete checkpoint) or a checkpoint directory"
    )
    ap.add_argument("out", help="output base model directory")
    ap.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    ap.add_argument(
        "--vae", help="autoencoder directory (diffusers AutoencoderKL) if the run's model.pretrained has none"
    )
    a = ap.parse_args(argv)
    path = export(a.source, a.out, a.raw, a.vae)
    print(f"wrote {path}: " + ", ".join(sorted(p.name for p in path.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
