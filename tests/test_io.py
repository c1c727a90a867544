"""vldm.io: atomic writes (whole file or nothing, no temp file left, umask permissions) and the mp4 writer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vldm.data.codec import decode_all
from vldm.io import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text, write_mp4


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path):
    p = tmp_path / "sub" / "a.json"
    old = os.umask(0o027)
    try:
        atomic_write_text(p, "one")
        atomic_write_bytes(p, b"two")
    finally:
        os.umask(old)
    assert p.read_bytes() == b"two"
    assert p.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("how", ["open", "path"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, how):
    p = tmp_path / "shard.tar"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        if how == "open":
            with atomic_open(p) as f:
                f.write(b"half of the new")
                raise RuntimeError("disk full")
        else:
            with atomic_path(p) as tmp:
                tmp.write_bytes(b"half of the new")
                raise RuntimeError("disk full")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["shard.tar"]


def test_atomic_path_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    p = tmp_path / "grid.png"
    with atomic_path(p) as tmp:
        # a hidden temp beside the target that the cleanup patterns (`.*.tmp.png`) match
        assert tmp.parent == tmp_path and tmp.name.startswith(".grid.png.") and tmp.name.endswith(".tmp.png")
        assert not p.exists()
        tmp.write_bytes(b"png")
    assert p.read_bytes() == b"png" and not tmp.exists()


def test_write_mp4_takes_uint8_frames_or_a_unit_range_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(-1, 1, 9)[None, None, None, :].expand(3, 4, 7, 9)  # (c, f, h, w), odd size
    video = (smooth + 0.02 * torch.randn(3, 4, 7, 9, generator=g)).clamp(-1, 1)
    p = write_mp4(tmp_path / "t.mp4", video, fps=4, crf=0)
    back = decode_all(str(p))
    assert back.shape == (4, 8, 10, 3)  # yuv420p: padded to even sizes by edge replication
    want = ((video + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(back[:, :7, :9].astype(float) - want).mean() < 4  # lossless luma, subsampled chroma
    frames = np.full((3, 16, 16, 3), 200, np.uint8)
    back = decode_all(str(write_mp4(tmp_path / "u.mp4", frames, fps=8)))
    assert back.shape == (3, 16, 16, 3) and abs(float(back.mean()) - 200) < 2
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.mp4", "u.mp4"]
