"""Real-video listing and decoding (plain files and WebDataset-style tar shards) and mp4 writing."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from eval_helpers import write_real_videos

from vldm.eval.videoio import list_videos, listing_digest, read_clip
from vldm.io import write_mp4


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_write_then_read_back(tmp_path):
    frames = np.zeros((6, 15, 21, 3), np.uint8)  # odd sizes are padded for yuv420p
    frames[:, :, :, 0] = np.arange(6)[:, None, None] * 40
    p = write_mp4(tmp_path / "a.mp4", frames, fps=4)
    assert not list(tmp_path.glob(".*"))  # the temp file was renamed
    clip, caption = read_clip(list_videos(str(p))[0], 3, stride=2)
    assert clip.shape == (3, 16, 22, 3) and caption == ""
    assert abs(int(clip[1, 5, 5, 0]) - 80) <= 3 and abs(int(clip[2, 5, 5, 0]) - 160) <= 3  # frames 0, 2, 4
    with pytest.raises(ValueError, match="need 7"):
        read_clip(list_videos(str(p))[0], 7)


def test_tar_shards_with_captions(tmp_path):
    src = write_real_videos(tmp_path / "src", 2, frames=4, size=16)
    mp4s = sorted(src.glob("*.mp4"))
    _tar(
        tmp_path / "shard-000000.tar",
        {
            "k0.json": json.dumps({"caption": "from json"}).encode(),
            "k0.mp4": mp4s[0].read_bytes(),
            "k1.mp4": mp4s[1].read_bytes(),
            "k1.txt": b"from txt",
        },
    )
    refs = list_videos(str(tmp_path / "*.tar"))
    assert [r.member for r in refs] == ["k0.mp4", "k1.mp4"]
    assert read_clip(refs[0], 4)[1] == "from json" and read_clip(refs[1], 4)[1] == "from txt"
    assert len(list_videos(str(tmp_path), limit=3)) == 3  # a directory: files and shards, sorted
    # the identity of a data set does not depend on where it is mounted
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "shard-000000.tar").write_bytes((tmp_path / "shard-000000.tar").read_bytes())
    assert listing_digest(list_videos(str(moved))) == listing_digest(refs)
    with pytest.raises(FileNotFoundError, match="no videos"):
        list_videos(str(tmp_path / "nothing*"))
