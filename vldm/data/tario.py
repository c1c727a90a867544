"""Tar I/O for shards: a deterministic sample writer and a streaming sample reader.

The reader works on any binary stream (file, pipe, fsspec), never seeks, and only reads the bytes of
the samples it is asked for: members of skipped samples are stepped over by tarfile's stream mode.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from vldm.data.format import split_member


class SampleWriter:
    """Append samples `{key}.{ext}` to a tar; headers carry no time or owner, so the same samples give
    the same bytes."""

    def __init__(self, fileobj: IO[bytes]):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


def iter_samples(
    fileobj: IO[bytes], want: Callable[[int], bool] | None = None, stop: int | None = None
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield (index, key, members) for each sample in tar order; members is None when `want(index)`
    is false (its bytes are skipped, not read). Stops after sample `stop - 1`. Raises tarfile.ReadError
    / OSError on a broken stream (the caller decides what that means for the rest of the shard)."""
    index, key, members, wanted = -1, None, {}, False
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member(info.name)
            if k != key:
                if key is not None:
                    yield index, key, (members if wanted else None)
                    if stop is not None and index + 1 >= stop:
                        return
                index, key, members = index + 1, k, {}
                wanted = want is None or want(index)
            if wanted:
                f = tar.extractfile(info)
                members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield index, key, (members if wanted else None)


def read_all(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a local shard (tests, the latent stage)."""
    with open(path, "rb") as f:
        return [(k, m) for _, k, m in iter_samples(f) if m is not None]
