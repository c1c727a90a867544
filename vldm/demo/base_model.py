"""Write the demo's random tiny image LDM directory (SD layout) from a training config's `model.unet`.

    python -m vldm.demo.base_model --config configs/demo_image.yaml --out BASE [--vae-channels 16,32,32]

The UNet architecture is declared once, in the config; the tiny CLIP text encoder's width follows its
`cross_attention_dim`. The random vae/ written here is replaced by `vldm.demo.autoencoder`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config whose model.unet is the image UNet")
    p.add_argument("--out", required=True, help="model directory to write (replaced if it exists)")
    p.add_argument("--vae-channels", default="16,32,32", help="VAE block_out_channels (default 16,32,32: factor 4)")
    a = p.parse_args(argv)

    from vldm.config import Config, build_config
    from vldm.models.base import build_tiny_base

    cfg = build_config(Config, [a.config])
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_base(tmp, unet=cfg.model.unet, vae_channels=tuple(int(c) for c in a.vae_channels.split(",")))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[base_model] tiny SD-layout model (random weights) -> {out}", flush=True)


if __name__ == "__main__":
    main()
