"""LPIPS (Zhang et al. 2018, VGG variant) from a local weights file: nothing is downloaded.

The network is the `lpips` package's: VGG16 features tapped after relu1_2, relu2_2, relu3_3, relu4_3
and relu5_3, each unit-normalised over channels, squared differences weighted by a learned 1x1 conv,
averaged over space and summed. `features` keeps torchvision's VGG16 indices, so its weights load
without renaming. The channel widths are a parameter, which lets tests build a tiny network of the
same shape; the file records them.

One file holds everything (safetensors, widths in its metadata). Make it once from the two official
files (torchvision `vgg16-397923af.pth` and lpips `weights/v0.1/vgg.pth`, copied to the machine):

    python -m vldm.models.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.safetensors

and name it with its sha256 in the decoder config (`decoder.lpips_weights`, `decoder.lpips_sha256`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from vldm.models.base import check_sha256, sha256_file

VGG16_CHANNELS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)
# ImageNet normalisation expressed for inputs in [-1, 1] (the lpips package's ScalingLayer)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    def __init__(self, channels: tuple[int, ...] = VGG16_CHANNELS):
        super().__init__()
        self.channels = tuple(channels)
        layers: list[nn.Module] = []
        self.taps: list[int] = []
        c_in = 3
        for stage, (c, n) in enumerate(zip(self.channels, CONVS_PER_STAGE)):
            if stage:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.channels])
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) images in [-1, 1] -> (n,) perceptual distances (gradients flow to x and y)."""
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = 0.0
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self.taps[k]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[k]((fx - fy) ** 2).mean((1, 2, 3))
                k += 1
                if k == len(self.taps):
                    break
        return total


def save_lpips(model: LPIPS, path: str | Path) -> str:
    """Write the single-file format; returns its sha256 (what configs pin)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"format": "vldm-lpips", "channels": json.dumps(list(model.channels))})
    return sha256_file(path)


def load_lpips(path: str | Path, sha256: str = "", device: torch.device | str = "cpu") -> LPIPS:
    """LPIPS from a local file written by `save_lpips`; refuses a file whose sha256 differs from `sha256`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS weights {p} not found (nothing is downloaded; see vldm.models.lpips)")
    check_sha256(p, sha256)
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "vldm-lpips":
        raise ValueError(
            f"{p} is not a vldm LPIPS file (convert the official weights with python -m vldm.models.lpips)"
        )
    model = LPIPS(tuple(json.loads(meta["channels"])))
    model.load_state_dict(sd, strict=True)
    return model.to(device)


def convert_official(vgg16_state: dict[str, torch.Tensor], lin_state: dict[str, torch.Tensor]) -> LPIPS:
    """torchvision VGG16 weights + lpips v0.1 linear layers -> LPIPS (full width)."""
    model = LPIPS(VGG16_CHANNELS)
    sd = {k: v for k, v in vgg16_state.items() if k.startswith("features.")}
    for k in range(len(VGG16_CHANNELS)):
        sd[f"lins.{k}.weight"] = lin_state[f"lin{k}.model.1.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m vldm.models.lpips", description="Convert the official LPIPS (VGG) weights to one local file."
    )
    ap.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth), e.g. vgg16-397923af.pth")
    ap.add_argument("--lin", required=True, help="lpips linear layers (.pth), e.g. lpips/weights/v0.1/vgg.pth")
    ap.add_argument("--out", required=True, help="output .safetensors")
    a = ap.parse_args(argv)
    model = convert_official(
        torch.load(a.vgg, map_location="cpu", weights_only=True),
        torch.load(a.lin, map_location="cpu", weights_only=True),
    )
    print(f"wrote {a.out} sha256={save_lpips(model, a.out)}")


if __name__ == "__main__":
    main()
