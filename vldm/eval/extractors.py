"""Feature networks of the metrics, loaded only from local files whose sha256 is checked.

Every extractor takes videos as float tensors (b, 3, f, h, w) in [-1, 1] (the layout and range of
`decode_latents`); real and generated videos are both quantised to 8 bits before they get here, so
they go through identical preprocessing.

- I3D (FVD): TorchScript (`i3d_torchscript.pt`, called with rescale=False, resize=False,
  return_features=True as in StyleGAN-V / fvd-comparison) or a pytorch-i3d state dict. Protocol: the
  first `num_frames` frames at `stride`, full-frame bilinear resize to 224x224, 400-d logits.
- Inception (FID): TorchScript taking 0..255 images (NVlabs / clean-fid `inception-2015-12-05.pt`,
  called with return_features=True), or pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`
  (run through `vldm.eval.fid_inception`, input [0, 1]); frames resized to 299x299, 2048-d pool features.
  The file type decides: a TorchScript archive holds code/, anything else must be that state dict.
- CLIP (CLIPSIM): a transformers `CLIPModel` directory; CLIP preprocessing (shorter side bicubic to
  224, centre crop, CLIP mean/std); CLIPSIM = mean over frames of cos(image, text).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

_DIGESTS: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:  # hashing a 600 MB CLIP once per process is enough
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(1 << 22):
                h.update(b)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file; for a directory, sha256 over its sorted (relative path, file sha256) lines.

    Hidden files (.cache, .DS_Store, ...) in a directory are ignored.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return _file_sha256(p)
    if p.is_dir():
        lines = []
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(p).as_posix()
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            lines.append(f"{rel} {_file_sha256(f)}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    raise FileNotFoundError(f"weights not found: {p} (nothing is downloaded: give a local path)")


def verify_weights(path: str | os.PathLike, expected: str, what: str) -> str:
    """Return the sha256 of `path`; refuse it if `expected` is given and differs."""
    got = weights_sha256(path)
    if expected and got != expected.strip().lower():
        raise ValueError(
            f"{what}: sha256 mismatch for {path}: expected {expected}, got {got}. "
            "This is not the file the suite pins (wrong download, truncated or different weights); "
            "fix the path or, if the new file is intended, update the sha256 (it changes the suite hash)."
        )
    return got


def select_frames(videos: torch.Tensor, num_frames: int, stride: int = 1) -> torch.Tensor:
    """The first `num_frames` frames taken every `stride` frames of (b, c, f, h, w) videos."""
    need = (num_frames - 1) * stride + 1
    if videos.shape[2] < need:
        raise ValueError(
            f"videos have {videos.shape[2]} frames; the protocol needs {need} ({num_frames} at stride {stride})"
        )
    return videos[:, :, :need:stride]


def resize_frames(videos: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Full-frame bilinear resize (align_corners=False, no antialias) of (b, c, f, h, w) videos."""
    size = (size, size) if isinstance(size, int) else size
    b = videos.shape[0]
    flat = rearrange(videos, "b c f h w -> (b f) c h w")
    if tuple(flat.shape[-2:]) != tuple(size):
        flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return rearrange(flat, "(b f) c h w -> b c f h w", b=b)


def _is_torchscript(path: Path) -> bool:
    # both torch.save and torch.jit.save write zip files; only TorchScript archives hold code/
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def _forward_args(module) -> set[str]:
    try:
        return {a.name for a in module.forward.schema.arguments}
    except Exception:  # noqa: BLE001 - plain nn.Module or an older archive: call it with the input only
        return set()


class I3DExtractor:
    """FVD features: 400-d I3D logits of 16-frame clips resized to 224x224."""

    name = "i3d"

    def __init__(
        self,
        path: str | os.PathLike,
        sha256: str = "",
        num_frames: int = 16,
        stride: int = 1,
        resize: int = 224,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
    ):
        self.path = Path(path).expanduser()
        self.sha256 = verify_weights(self.path, sha256, "fvd.weights (I3D)")
        self.num_frames, self.stride, self.resize = num_frames, stride, resize
        self.device, self.batch_size = torch.device(device), batch_size
        if _is_torchscript(self.path):
            self.format = "torchscript"
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            args = _forward_args(self.net)
            self._kwargs = {
                k: v for k, v in dict(rescale=False, resize=False, return_features=True).items() if k in args
            }
        else:
            from vldm.eval.i3d import InceptionI3d

            self.format = "state_dict"
            sd = torch.load(str(self.path), map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
            classes = sd["logits.conv3d.weight"].shape[0] if "logits.conv3d.weight" in sd else 400
            net = InceptionI3d(num_classes=classes)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{self.path} is not a pytorch-i3d InceptionI3d state dict: missing {missing[:4]}, "
                    f"unexpected {unexpected[:4]}"
                )
            self.net, self._kwargs = net.to(self.device).eval(), {}
        self.dim: int | None = None

    def protocol(self) -> dict:
        return {
            "extractor": "i3d",
            "format": self.format,
            "sha256": self.sha256,
            "frames": self.num_frames,
            "stride": self.stride,
            "resize": f"full-frame bilinear {self.resize}x{self.resize}",
            "input": "[-1,1]",
        }

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        """(b, 3, f, h, w) in [-1, 1] -> (b, 400) float64 logits."""
        clips = select_frames(videos, self.num_frames, self.stride)
        outs = []
        for i in range(0, clips.shape[0], self.batch_size):
            x = resize_frames(clips[i : i + self.batch_size].float(), self.resize).to(self.device)
            out = self.net(x, **self._kwargs)
            outs.append(out.reshape(out.shape[0], -1).double().cpu())
        feats = torch.cat(outs)
        self.dim = feats.shape[1]
        return feats


def load_pytorch_fid_inception(path: str | os.PathLike):
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a plain state dict) in FIDInceptionV3.

    Every key must match: a missing or unexpected key (another Inception, torchvision's ImageNet
    weights with AuxLogits, a different file) is refused with the keys named. BatchNorm's
    num_batches_tracked counters are optional (older files lack them; inference never reads them).
    """
    from vldm.eval.fid_inception import FIDInceptionV3

    path = Path(path)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - say what the file should have been
        raise ValueError(
            f"fid.weights: {path} is neither a TorchScript archive nor a loadable state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"fid.weights: {path} holds a {type(sd).__name__}, not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net = FIDInceptionV3()
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:

        def show(keys):
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"

        raise ValueError(
            f"fid.weights: {path} is not pytorch-fid's FID Inception state dict "
            f"(pt_inception-2015-12-05-6726825d.pth): missing keys {show(missing)}, "
            f"unexpected keys {show(unexpected)}, wrong shapes "
            f"{show([f'{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}' for k in wrong])}"
        )
    net.load_state_dict(sd, strict=False)  # complete but for optional counters, checked above
    return net


class InceptionExtractor:
    """FID features: 2048-d Inception-v3 pool features of single frames resized to 299x299."""

    name = "inception"

    def __init__(
        self,
        path: str | os.PathLike,
        sha256: str = "",
        resize: int = 299,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        self.path = Path(path).expanduser()
        self.sha256 = verify_weights(self.path, sha256, "fid.weights (Inception)")
        self.resize, self.device, self.batch_size = resize, torch.device(device), batch_size
        if _is_torchscript(self.path):
            self.format = "torchscript"
            self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            self._kwargs = {"return_features": True} if "return_features" in _forward_args(self.net) else {}
        else:
            self.format = "pytorch-fid"
            self.net, self._kwargs = load_pytorch_fid_inception(self.path).to(self.device).eval(), {}

    def protocol(self) -> dict:
        return {
            "extractor": "inception",
            "format": self.format,
            "sha256": self.sha256,
            "resize": f"bilinear {self.resize}x{self.resize}",
            "input": "[0,255]" if self.format == "torchscript" else "[0,1] (pytorch-fid maps it to [-1,1])",
        }

    @torch.no_grad()
    def frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) in [-1, 1] -> (n, 2048) float64."""
        outs = []
        for i in range(0, frames.shape[0], self.batch_size):
            x = frames[i : i + self.batch_size].float()
            if tuple(x.shape[-2:]) != (self.resize, self.resize):
                x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            if self.format == "torchscript":
                x = ((x + 1) * 127.5).clamp(0, 255)
            else:  # pytorch-fid's input: [0, 1] (u8 / 255 for 8-bit frames, as its image loader gives)
                x = ((x + 1) / 2).clamp(0, 1)
            out = self.net(x.to(self.device), **self._kwargs)
            outs.append(out.reshape(out.shape[0], -1).double().cpu())
        return torch.cat(outs)

    def __call__(self, videos: torch.Tensor, num_frames: int = 0) -> torch.Tensor:
        """(b, 3, f, h, w) -> (b * f', 2048): every frame is one sample of per-frame FID."""
        if num_frames:
            videos = select_frames(videos, num_frames)
        return self.frames(rearrange(videos, "b c f h w -> (b f) c h w"))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPExtractor:
    """CLIP image/text embeddings for CLIPSIM (and optional feature consistency)."""

    name = "clip"

    def __init__(
        self, model_dir: str | os.PathLike, sha256: str = "", device: str | torch.device = "cpu", batch_size: int = 32
    ):
        from transformers import AutoTokenizer, CLIPModel

        self.path = Path(model_dir).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"clipsim.model_dir: {self.path} is not a local directory (nothing is downloaded)")
        self.sha256 = verify_weights(self.path, sha256, "clipsim.model_dir (CLIP)")
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        size = self.model.config.vision_config.image_size
        mean, std, crop = CLIP_MEAN, CLIP_STD, size
        pp = self.path / "preprocessor_config.json"
        if pp.exists():  # a checkpoint's own preprocessing wins over CLIP's defaults
            cfg = json.loads(pp.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            s = cfg.get("size", size)
            size = s.get("shortest_edge", size) if isinstance(s, dict) else int(s)
            c = cfg.get("crop_size", crop)
            crop = c.get("height", crop) if isinstance(c, dict) else int(c)
        self.size, self.crop = int(size), int(crop)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def protocol(self) -> dict:
        return {
            "extractor": "clip",
            "sha256": self.sha256,
            "preprocess": f"shorter side bicubic {self.size}, centre crop {self.crop}, CLIP mean/std",
            "score": "cosine, mean over frames",
        }

    def _preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = (frames.float() + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) in [-1, 1] -> (n, d) unit-norm image embeddings."""
        outs = []
        for i in range(0, frames.shape[0], self.batch_size):
            px = self._preprocess(frames[i : i + self.batch_size]).to(self.device)
            out = self.model.get_image_features(pixel_values=px)
            out = getattr(out, "pooler_output", out)  # transformers 5 may wrap the projection in an output object
            outs.append(F.normalize(out.float(), dim=-1).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1).cpu()

    def clipsim(self, videos: torch.Tensor, prompts: list[str], num_frames: int = 0) -> torch.Tensor:
        """(b, 3, f, h, w) and b prompts -> (b,) CLIPSIM: mean over frames of cos(frame, prompt)."""
        if num_frames:
            videos = select_frames(videos, num_frames)
        b, f = videos.shape[0], videos.shape[2]
        img = self.image_embeds(rearrange(videos, "b c f h w -> (b f) c h w")).view(b, f, -1)
        txt = self.text_embeds(prompts)
        return (img * txt[:, None]).sum(-1).mean(1).double()
