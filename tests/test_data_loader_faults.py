"""The loader under data faults, in the production shape (batch 1 per rank, 2 loader workers, uint8
pixels, a shuffle buffer, 2 ranks): corrupt samples are skipped and the batch refilled from the same
order (so batches equal those of the order without them), resume stays exact across a skipped sample,
and shards on flaky storage (a real fsspec filesystem and a real pipe: command that fail) are retried
with backoff, losing nothing when the failure is transient and only the unreadable rest when it is not."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from test_data_loader import read_all_prefix, shard_corpus, take

from vldm.config.data import DataConfig, SyntheticConfig
from vldm.data import build_loader
from vldm.data.synthetic import write_corpus
from vldm.data.tario import SampleWriter, read_all

pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("ignore:This DataLoader will create")]
WORKERS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 videos x 4 clips = 48 samples in 4 shards of 12."""
    root = tmp_path_factory.mktemp("faults")
    write_corpus(SyntheticConfig(output=str(root / "videos"), count=12, size="32", frames=32, fps=8, seed=4))
    shard_corpus(root / "videos", root / "shards", videos_per_shard=3, frames=8, fps=8, size="32")
    return root / "shards"


def prod_cfg(path: Path | str, **kw) -> DataConfig:
    """The production shape at toy size: 1 clip per batch, 2 workers, uint8, random clip windows."""
    base = dict(
        shards=str(path),
        num_frames=4,
        frame_stride=2,
        size=32,
        batch_size=1,
        num_workers=WORKERS,
        shuffle_buffer=4,
        pixel_dtype="uint8",
        clip_start="random",
        retry_backoff_s=0.01,
    )
    base.update(kw)
    return DataConfig(**base)


def corrupt_copy(src: Path, dst: Path, broken: dict[str, str]) -> Path:
    """A copy of the shards in which `broken` samples (key -> "mp4" | "cut" | "json") are damaged inside
    valid tars: garbage mp4 bytes, an mp4 member truncated to a third, unparseable json."""
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.suffix != ".tar":
            shutil.copy(p, dst)
            continue
        with open(dst / p.name, "wb") as f:
            w = SampleWriter(f)
            for key, m in read_all(str(p)):
                m = dict(m)
                kind = broken.get(key)
                if kind == "mp4":
                    m["mp4"] = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4
                elif kind == "cut":
                    m["mp4"] = m["mp4"][: len(m["mp4"]) // 3]
                elif kind == "json":
                    m["json"] = b'{"key": "broken'
                w.write(key, m)
            w.close()
    return dst


def per_worker(batches: list[dict], k: int = WORKERS) -> list[list[tuple[str, torch.Tensor]]]:
    """Each logical worker's stream of (key, pixels): batch g comes from worker g % k."""
    out: list[list] = [[] for _ in range(k)]
    for g, b in enumerate(batches):
        out[g % k] += list(zip(b["keys"], b["pixels"]))
    return out


def assert_is_order_without(got: list[dict], clean: list[dict], broken: set[str]) -> None:
    """`got` equals the `clean` order with the broken samples removed, worker stream by worker stream
    (keys and pixels, bit for bit): nothing zero-filled, duplicated or substituted."""
    for g_stream, c_stream in zip(per_worker(got), per_worker(clean)):
        expected = [(k, px) for k, px in c_stream if k not in broken][: len(g_stream)]
        assert [k for k, _ in g_stream] == [k for k, _ in expected]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(g_stream, expected))


@pytest.mark.parametrize("where", ["one rank", "all ranks"])
def test_corrupt_samples_at_batch_1_with_workers_are_refilled_from_the_order_and_resume_exactly(
    shards, tmp_path, where, caplog
):
    cfg = prod_cfg(shards)
    steps = 30  # 24 samples per rank per epoch: crosses into epoch 1
    clean = [take(build_loader(cfg, rank=r, world_size=2, seed=7), steps + 8) for r in range(2)]
    # damage samples the ranks read early in epoch 0: one of each kind
    picks = [clean[1][2], clean[1][5], clean[1][9]] if where == "one rank" else [clean[1][3], clean[0][4], clean[0][8]]
    broken = {b["keys"][0]: kind for b, kind in zip(picks, ("mp4", "cut", "json"))}
    bad = corrupt_copy(shards, tmp_path / "bad", broken)
    bcfg = replace(cfg, shards=str(bad))
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        loaders = [build_loader(bcfg, rank=r, world_size=2, seed=7) for r in range(2)]
        got = [take(ld, steps) for ld in loaders]
    for r in range(2):
        assert all(len(b["keys"]) == 1 and b["pixels"].shape == (1, 3, 4, 32, 32) for b in got[r])  # never empty
        assert not set(broken) & {k for b in got[r] for k in b["keys"]}
        assert_is_order_without(got[r], clean[r], set(broken))
    if where == "one rank":
        assert [b["keys"] for b in got[0]] == [b["keys"] for b in clean[0][:steps]]  # rank 0 untouched
        assert loaders[0].stats["corrupt"] == 0
    stats = [ld.stats for ld in loaders]
    assert sum(s["corrupt"] for s in stats) >= 3 and all(s["batches"] == s["samples"] == steps for s in stats)
    reasons = {r: sum(s["corrupt_by_reason"].get(r, 0) for s in stats) for r in ("decode_error", "bad_json")}
    assert reasons["decode_error"] >= 2 and reasons["bad_json"] >= 1
    assert all(f"skipped corrupt sample {k} (" in caplog.text for k in broken)  # logged with key and reason

    # resume: stopped before, at and after the skipped samples, each rank from its own state
    for stop in (2, 6, 13):
        for r in range(2):
            first = build_loader(bcfg, rank=r, world_size=2, seed=7)
            head = take(first, stop)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
            resumed = build_loader(bcfg, rank=r, world_size=2, seed=7)
            resumed.load_state_dict(state)
            tail = take(resumed, steps - stop)
            assert [b["keys"] for b in head + tail] == [b["keys"] for b in got[r]], (where, stop, r)
            assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(head + tail, got[r]))
            assert resumed.stats == loaders[r].stats


def test_every_corrupt_sample_in_a_row_stops_with_a_clear_error(shards, tmp_path):
    every = {k: "json" for p in sorted(shards.glob("*.tar")) for k, _ in read_all(str(p))}
    bad = corrupt_copy(shards, tmp_path / "bad", every)
    loader = build_loader(prod_cfg(bad, num_workers=0, max_consecutive_corrupt=30), seed=0)
    with pytest.raises(RuntimeError, match=r"30 unreadable samples in a row .*max_consecutive_corrupt=30.*bad_json"):
        take(loader, 1)


# ------------------------------------------------------------------------------------- flaky storage
class FlakyFS(LocalFileSystem):
    """The local file system behind a `flaky://` URL, failing as a plan file says: for each shard name,
    the first `fail_opens` opens raise (an object store's 503), then `fail_reads` opens return a file
    that raises after `fail_after` bytes (a connection reset mid-read). Counters live in the plan
    file itself (locked), so loader worker processes share them."""

    protocol = "flaky"
    plan_path: str = ""

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        f = super()._open(path, mode, block_size, **kwargs)
        name = Path(self._strip_protocol(path)).name
        with open(self.plan_path, "r+") as pf:
            fcntl.flock(pf, fcntl.LOCK_EX)
            plan = json.load(pf)
            entry = plan.get(name)
            if entry is None or "r" not in mode:
                return f
            entry["opens"] = entry.get("opens", 0) + 1
            fail_open = entry["opens"] <= entry.get("fail_opens", 0)
            fail_read = not fail_open and entry.get("reads_failed", 0) < entry.get("fail_reads", 0)
            entry["reads_failed"] = entry.get("reads_failed", 0) + int(fail_read)
            pf.seek(0)
            pf.truncate()
            json.dump(plan, pf)
        if fail_open:
            f.close()
            raise OSError(f"503 SlowDown: {name} (open {entry['opens']})")
        return _FailingFile(f, entry["fail_after"]) if fail_read else f


class _FailingFile:
    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer (mid-read)")
        data = self.f.read(n if n >= 0 and n <= self.left else self.left)
        self.left -= len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture()
def flaky(tmp_path):
    """Registers `flaky://`; yields a function that writes the failure plan and returns the plan path."""
    plan_path = tmp_path / "flaky_plan.json"
    FlakyFS.plan_path = str(plan_path)
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)

    def set_plan(plan: dict) -> Path:
        plan_path.write_text(json.dumps(plan))
        return plan_path

    yield set_plan
    from fsspec.registry import _registry

    _registry.pop("flaky", None)


def test_transient_shard_failures_are_retried_and_lose_nothing(shards, flaky):
    """First 2 opens of one shard fail, another shard's stream breaks midway once: every sample is still
    read exactly as from the local path, in the same order."""
    plan = flaky(
        {
            "shard-000000.tar": {"fail_opens": 2},
            "shard-000001.tar": {"fail_reads": 1, "fail_after": 60_000},
            "shard-000002.tar": {"fail_opens": 1, "fail_reads": 1, "fail_after": 30_000},
        }
    )
    steps = 24
    for rank in range(2):
        local = take(build_loader(prod_cfg(shards), rank=rank, world_size=2, seed=1), steps)
        loader = build_loader(prod_cfg(f"flaky://{shards}"), rank=rank, world_size=2, seed=1)
        remote = take(loader, steps)
        assert [b["keys"] for b in remote] == [b["keys"] for b in local]
        assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(remote, local))
        assert loader.stats["corrupt"] == 0
    counts = json.loads(plan.read_text())
    assert counts["shard-000000.tar"]["opens"] >= 3 and counts["shard-000001.tar"]["reads_failed"] == 1
    assert counts["shard-000002.tar"]["reads_failed"] == 1


def test_a_shard_that_stays_unreadable_is_counted_and_the_run_goes_on(shards, flaky, tmp_path, caplog):
    cut = 40_000
    flaky({"shard-000003.tar": {"fail_reads": 10**6, "fail_after": cut}})  # breaks at the same byte every time
    # what can be read of it: the samples whole before that byte (as from a file truncated there)
    (tmp_path / "cut.tar").write_bytes((shards / "shard-000003.tar").read_bytes()[:cut])
    readable = {k for k, _ in read_all_prefix(tmp_path / "cut.tar")}
    good = {k for p in sorted(shards.glob("*.tar"))[:3] for k, _ in read_all(str(p))} | readable
    assert 0 < len(readable) < 12
    cfg = prod_cfg(f"flaky://{shards}", num_workers=0, shuffle_buffer=0, read_retries=2)
    loader = build_loader(cfg, rank=0, world_size=1, seed=2)
    with caplog.at_level(logging.WARNING, logger="vldm.data"):
        batches = take(loader, len(good) + 1)  # every readable sample of epoch 0, then epoch 1's first
    keys = [k for b in batches for k in b["keys"]]
    assert all(len(b["keys"]) == 1 for b in batches) and set(keys[:-1]) == good and len(set(keys[:-1])) == len(good)
    lost = 12 - len(readable)
    assert loader.stats["corrupt"] == loader.stats["corrupt_by_reason"]["shard_error"] == lost
    assert loader.stats["shard_retries"] == 2
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text and "(shard_error)" in caplog.text
    assert f"skipped {lost} corrupt samples shard-000003.tar#{len(readable)}" in caplog.text  # named by shard, index


PIPE_SCRIPT = """#!/bin/bash
# $1 shard, $2 counter file: the 2nd run (the loader's first read; the 1st counts the samples) writes
# part of the shard and fails, as a download cut off by the network would
n=$(( $(cat "$2" 2>/dev/null || echo 0) + 1 )); echo $n > "$2"
if [ $n -eq 2 ]; then head -c 50000 "$1"; exit 1; fi
cat "$1"
"""


def test_a_pipe_command_that_fails_once_is_retried(shards, tmp_path):
    """`pipe:` sources (e.g. `aws s3 cp s3://... -`): a command that writes part of the shard and exits
    non-zero is a read error, retried; the retry's output is read on after the samples already read."""
    script = tmp_path / "fetch.sh"
    script.write_text(PIPE_SCRIPT)
    tars = sorted(shards.glob("*.tar"))
    assert all(t.stat().st_size > 60_000 for t in tars)  # the cut lands inside the shard
    spec = "::".join(f"pipe:bash {script} {t} {tmp_path}/runs{i}" for i, t in enumerate(tars))
    local = build_loader(prod_cfg(shards, num_workers=0, shuffle_buffer=0), seed=3)
    piped = build_loader(prod_cfg(spec, num_workers=0, shuffle_buffer=0), seed=3)
    a, b = take(local, 48), take(piped, 48)
    assert [x["keys"] for x in a] == [x["keys"] for x in b] and piped.stats["corrupt"] == 0
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b))
    assert (
        piped.stats["shard_retries"] == 4
        and [(tmp_path / f"runs{i}").read_text().strip() for i in range(4)] == ["3"] * 4
    )
