"""Feature extractors load only local files, through the real loading code, with sha256 checked."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import TinyI3D, TinyInception, save_tiny_clip, save_torchscript

from vldm.eval.extractors import (
    CLIPExtractor,
    I3DExtractor,
    InceptionExtractor,
    resize_frames,
    select_frames,
    weights_sha256,
)
from vldm.eval.i3d import InceptionI3d


def _videos(b=2, f=16, h=40, w=56, seed=0):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_i3d_torchscript_protocol(tmp_path):
    path = save_torchscript(TinyI3D, tmp_path / "i3d_torchscript.pt")
    ext = I3DExtractor(path, sha256=weights_sha256(path))
    assert ext.format == "torchscript" and ext._kwargs == dict(rescale=False, resize=False, return_features=True)
    v = _videos(f=20)
    feats = ext(v)
    assert feats.shape == (2, 400) and feats.dtype == torch.float64
    # 16 frames, full-frame resize to 224: the extra frames are ignored, batching does not matter
    torch.testing.assert_close(feats, ext(v[:, :, :16]))
    torch.testing.assert_close(feats[1:], ext(v[1:]))
    assert ext.protocol()["frames"] == 16 and "224x224" in ext.protocol()["resize"]
    with pytest.raises(ValueError, match="needs 16"):
        ext(v[:, :, :8])


def test_i3d_state_dict_of_the_real_architecture(tmp_path):
    torch.manual_seed(0)
    net = InceptionI3d(400)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # DataParallel prefix is accepted
    torch.save(sd, tmp_path / "rgb_imagenet.pt")
    ext = I3DExtractor(tmp_path / "rgb_imagenet.pt", batch_size=1)
    assert ext.format == "state_dict"
    feats = ext(_videos(b=1, h=32, w=32))
    assert feats.shape == (1, 400) and torch.isfinite(feats).all()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pytorch-i3d"):
        I3DExtractor(tmp_path / "other.pt")


def test_wrong_sha256_is_refused_with_a_clear_error(tmp_path):
    path = save_torchscript(TinyI3D, tmp_path / "i3d.pt")
    with pytest.raises(ValueError, match=r"fvd.weights \(I3D\): sha256 mismatch .* expected 0{64}"):
        I3DExtractor(path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        I3DExtractor(tmp_path / "missing.pt")


def test_inception_torchscript_per_frame_features(tmp_path):
    path = save_torchscript(TinyInception, tmp_path / "inception-2015-12-05.pt")
    ext = InceptionExtractor(path, sha256=weights_sha256(path))
    feats = ext(_videos(b=2, f=3))
    assert feats.shape == (6, 2048)  # every frame is a sample
    assert ext(_videos(b=2, f=3), num_frames=2).shape == (4, 2048)
    torch.save(TinyInception().state_dict(), tmp_path / "pt_inception.pth")
    with pytest.raises(ValueError, match="not a TorchScript"):
        InceptionExtractor(tmp_path / "pt_inception.pth")


def test_clip_from_a_local_directory(tmp_path):
    d = save_tiny_clip(tmp_path / "clip")
    ext = CLIPExtractor(d, sha256=weights_sha256(d))
    v = _videos(b=2, f=3, h=48, w=64)
    s = ext.clipsim(v, ["a red square", "a blue circle"])
    assert s.shape == (2,) and (s.abs() <= 1).all()
    # CLIPSIM is the frame average of per-frame cosine similarities
    img = ext.image_embeds(v[0].transpose(0, 1))
    txt = ext.text_embeds(["a red square"])
    assert s[0].item() == pytest.approx((img @ txt[0]).mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        CLIPExtractor(d, sha256="f" * 64)


def test_directory_digest_tracks_content_not_hidden_files(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "a.bin").write_bytes(b"123")
    h0 = weights_sha256(d)
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("junk")
    assert weights_sha256(d) == h0
    (d / "a.bin").write_bytes(b"124")
    assert weights_sha256(d) != h0


def test_frame_selection_and_resize():
    v = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 3, 10, 4, 6)
    assert select_frames(v, 4, stride=3)[0, 0, :, 0, 0].tolist() == [0, 3, 6, 9]
    assert resize_frames(v, 8).shape == (1, 3, 10, 8, 8)  # full frame: aspect ratio not kept
