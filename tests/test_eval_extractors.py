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
from vldm.eval.fid_inception import FIDInceptionV3
from vldm.eval.i3d import InceptionI3d

# pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-6726825d.pth), transcribed from the
# sources (pytorch-fid src/pytorch_fid/inception.py: torchvision's Inception3 with aux_logits=False,
# num_classes=1008 and its FIDInceptionA/C/E_1/E_2 blocks; torchvision models/inception.py for the
# layers): every BasicConv2d as "name out_channels in_channels kernel_h kernel_w". Each one holds
# conv.weight and bn.{weight,bias,running_mean,running_var,num_batches_tracked}; plus fc.weight/bias.
PYTORCH_FID_CONVS = """
    Conv2d_1a_3x3 32 3 3 3  |  Conv2d_2a_3x3 32 32 3 3  |  Conv2d_2b_3x3 64 32 3 3
    Conv2d_3b_1x1 80 64 1 1  |  Conv2d_4a_3x3 192 80 3 3  |  Mixed_5b.branch1x1 64 192 1 1
    Mixed_5b.branch5x5_1 48 192 1 1  |  Mixed_5b.branch5x5_2 64 48 5 5  |  Mixed_5b.branch3x3dbl_1 64 192 1 1
    Mixed_5b.branch3x3dbl_2 96 64 3 3  |  Mixed_5b.branch3x3dbl_3 96 96 3 3  |  Mixed_5b.branch_pool 32 192 1 1
    Mixed_5c.branch1x1 64 256 1 1  |  Mixed_5c.branch5x5_1 48 256 1 1  |  Mixed_5c.branch5x5_2 64 48 5 5
    Mixed_5c.branch3x3dbl_1 64 256 1 1  |  Mixed_5c.branch3x3dbl_2 96 64 3 3  |  Mixed_5c.branch3x3dbl_3 96 96 3 3
    Mixed_5c.branch_pool 64 256 1 1  |  Mixed_5d.branch1x1 64 288 1 1  |  Mixed_5d.branch5x5_1 48 288 1 1
    Mixed_5d.branch5x5_2 64 48 5 5  |  Mixed_5d.branch3x3dbl_1 64 288 1 1  |  Mixed_5d.branch3x3dbl_2 96 64 3 3
    Mixed_5d.branch3x3dbl_3 96 96 3 3  |  Mixed_5d.branch_pool 64 288 1 1  |  Mixed_6a.branch3x3 384 288 3 3
    Mixed_6a.branch3x3dbl_1 64 288 1 1  |  Mixed_6a.branch3x3dbl_2 96 64 3 3  |  Mixed_6a.branch3x3dbl_3 96 96 3 3
    Mixed_6b.branch1x1 192 768 1 1  |  Mixed_6b.branch7x7_1 128 768 1 1  |  Mixed_6b.branch7x7_2 128 128 1 7
    Mixed_6b.branch7x7_3 192 128 7 1  |  Mixed_6b.branch7x7dbl_1 128 768 1 1  |  Mixed_6b.branch7x7dbl_2 128 128 7 1
    Mixed_6b.branch7x7dbl_3 128 128 1 7  |  Mixed_6b.branch7x7dbl_4 128 128 7 1  |  Mixed_6b.branch7x7dbl_5 192 128 1 7
    Mixed_6b.branch_pool 192 768 1 1  |  Mixed_6c.branch1x1 192 768 1 1  |  Mixed_6c.branch7x7_1 160 768 1 1
    Mixed_6c.branch7x7_2 160 160 1 7  |  Mixed_6c.branch7x7_3 192 160 7 1  |  Mixed_6c.branch7x7dbl_1 160 768 1 1
    Mixed_6c.branch7x7dbl_2 160 160 7 1  |  Mixed_6c.branch7x7dbl_3 160 160 1 7  |  Mixed_6c.branch7x7dbl_4 160 160 7 1
    Mixed_6c.branch7x7dbl_5 192 160 1 7  |  Mixed_6c.branch_pool 192 768 1 1  |  Mixed_6d.branch1x1 192 768 1 1
    Mixed_6d.branch7x7_1 160 768 1 1  |  Mixed_6d.branch7x7_2 160 160 1 7  |  Mixed_6d.branch7x7_3 192 160 7 1
    Mixed_6d.branch7x7dbl_1 160 768 1 1  |  Mixed_6d.branch7x7dbl_2 160 160 7 1  |  Mixed_6d.branch7x7dbl_3 160 160 1 7
    Mixed_6d.branch7x7dbl_4 160 160 7 1  |  Mixed_6d.branch7x7dbl_5 192 160 1 7  |  Mixed_6d.branch_pool 192 768 1 1
    Mixed_6e.branch1x1 192 768 1 1  |  Mixed_6e.branch7x7_1 192 768 1 1  |  Mixed_6e.branch7x7_2 192 192 1 7
    Mixed_6e.branch7x7_3 192 192 7 1  |  Mixed_6e.branch7x7dbl_1 192 768 1 1  |  Mixed_6e.branch7x7dbl_2 192 192 7 1
    Mixed_6e.branch7x7dbl_3 192 192 1 7  |  Mixed_6e.branch7x7dbl_4 192 192 7 1  |  Mixed_6e.branch7x7dbl_5 192 192 1 7
    Mixed_6e.branch_pool 192 768 1 1  |  Mixed_7a.branch3x3_1 192 768 1 1  |  Mixed_7a.branch3x3_2 320 192 3 3
    Mixed_7a.branch7x7x3_1 192 768 1 1  |  Mixed_7a.branch7x7x3_2 192 192 1 7  |  Mixed_7a.branch7x7x3_3 192 192 7 1
    Mixed_7a.branch7x7x3_4 192 192 3 3  |  Mixed_7b.branch1x1 320 1280 1 1  |  Mixed_7b.branch3x3_1 384 1280 1 1
    Mixed_7b.branch3x3_2a 384 384 1 3  |  Mixed_7b.branch3x3_2b 384 384 3 1  |  Mixed_7b.branch3x3dbl_1 448 1280 1 1
    Mixed_7b.branch3x3dbl_2 384 448 3 3  |  Mixed_7b.branch3x3dbl_3a 384 384 1 3
    Mixed_7b.branch3x3dbl_3b 384 384 3 1
    Mixed_7b.branch_pool 192 1280 1 1  |  Mixed_7c.branch1x1 320 2048 1 1  |  Mixed_7c.branch3x3_1 384 2048 1 1
    Mixed_7c.branch3x3_2a 384 384 1 3  |  Mixed_7c.branch3x3_2b 384 384 3 1  |  Mixed_7c.branch3x3dbl_1 448 2048 1 1
    Mixed_7c.branch3x3dbl_2 384 448 3 3  |  Mixed_7c.branch3x3dbl_3a 384 384 1 3
    Mixed_7c.branch3x3dbl_3b 384 384 3 1
    Mixed_7c.branch_pool 192 2048 1 1
"""


def pytorch_fid_keys() -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's state dict with its shape (num_batches_tracked: a 0-d counter)."""
    keys = {}
    for entry in PYTORCH_FID_CONVS.replace("|", "\n").split("\n"):
        if not entry.strip():
            continue
        name, out, cin, kh, kw = entry.split()
        out, cin, kh, kw = int(out), int(cin), int(kh), int(kw)
        keys[f"{name}.conv.weight"] = (out, cin, kh, kw)
        for b in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.bn.{b}"] = (out,)
        keys[f"{name}.bn.num_batches_tracked"] = ()
    keys["fc.weight"], keys["fc.bias"] = (1008, 2048), (1008,)
    return keys


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
    assert ext.format == "torchscript" and ext.protocol()["input"] == "[0,255]"


def _random_fid_inception(seed=0) -> FIDInceptionV3:
    """FIDInceptionV3 with random weights and non-trivial BatchNorm statistics (eval mode uses them)."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def test_pytorch_fid_architecture_has_exactly_the_pth_keys_and_shapes():
    expected = pytorch_fid_keys()
    assert len(expected) == 94 * 6 + 2
    got = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    # torchvision's inception_v3(aux_logits=False) has 23,834,568 parameters with 1000 classes
    n = sum(v.numel() for k, v in FIDInceptionV3().named_parameters())
    assert n == 23_834_568 + 8 * 2049


def test_pytorch_fid_state_dict_loads_through_the_extractor(tmp_path):
    net = _random_fid_inception()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    ext = InceptionExtractor(path, sha256=weights_sha256(path), batch_size=3)
    assert ext.format == "pytorch-fid" and ext.protocol()["format"] == "pytorch-fid"
    sd = ext.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())  # the file's weights, all of them
    v = _videos(b=2, f=2, h=24, w=32)
    feats = ext(v)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # pool3 averages ReLU outputs
    # the contract: frames in [-1, 1] -> pytorch-fid's input [0, 1], resized bilinearly to 299, then 2x - 1
    frames = v.transpose(1, 2).reshape(4, 3, 24, 32)
    x = torch.nn.functional.interpolate((frames + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = net.eval().features(2 * x - 1).double()
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    # batching does not matter; sha256 is checked as for every weight file
    torch.testing.assert_close(ext(v[1:]), feats[2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        InceptionExtractor(path, sha256="0" * 64)


def test_pytorch_fid_legacy_file_without_counters_loads(tmp_path):
    # the released .pth predates torch's zip format; BatchNorm counters are optional
    net = _random_fid_inception(seed=1)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    ext = InceptionExtractor(path)
    assert ext.format == "pytorch-fid"
    assert all(torch.equal(ext.net.state_dict()[k], v) for k, v in sd.items())


def test_a_state_dict_that_is_not_pytorch_fids_is_refused_naming_the_keys(tmp_path):
    sd = _random_fid_inception().state_dict()
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's ImageNet Inception has these
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError,
        match=r"missing keys 1 \['Mixed_7c.branch_pool.conv.weight'\], "
        r"unexpected keys 1 \['AuxLogits.fc.weight'\]",
    ):
        InceptionExtractor(tmp_path / "bad.pth")
    sd = _random_fid_inception().state_dict()
    sd["fc.weight"] = torch.zeros(1000, 2048)  # 1000 classes: not the FID graph's 1008
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"wrong shapes 1 \['fc.weight \(1000, 2048\) != \(1008, 2048\)'\]"):
        InceptionExtractor(tmp_path / "shape.pth")
    torch.save(TinyInception().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="not pytorch-fid's FID Inception state dict"):
        InceptionExtractor(tmp_path / "tiny.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="neither a TorchScript archive nor a loadable state dict"):
        InceptionExtractor(tmp_path / "junk.pth")


def test_fid_pool_branches_follow_the_tensorflow_graph():
    net = FIDInceptionV3()
    ones = torch.ones(1, 4, 5, 5)
    # average pools exclude the zero padding: a constant stays constant up to the border
    for block in (net.Mixed_5b, net.Mixed_6b, net.Mixed_7b):
        torch.testing.assert_close(block.pool(ones), ones)
    # the last E block max-pools: a single peak spreads to its 3x3 neighbourhood unchanged
    peak = torch.zeros(1, 1, 5, 5)
    peak[0, 0, 2, 2] = 4.0
    out = net.Mixed_7c.pool(peak)
    assert out[0, 0, 1:4, 1:4].eq(4.0).all() and out.sum() == 36.0


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
