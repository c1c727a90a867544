"""Data faults through the real entry point (`bash slurm/train_temporal.sbatch`, 2 ranks of `python -m
vldm.train`) in the production shape at toy size: 1 clip per rank, 2 loader workers per rank, uint8
pixels, gradient accumulation 2, a VAE encoding the pixels, W&B offline.

- corrupt samples (garbage mp4 bytes, a truncated mp4 member, bad json) on one rank only: the run
  reaches max_steps, the skipped samples are counted per reason in the metrics and W&B and logged by
  key, and the losses equal, bit for bit, those of a run fed the same order without those samples;
- corrupt samples on every rank, shards read through a pipe: command that fails transiently: stopped
  after a step past the corrupt samples and resumed, the run continues the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_data_loader import shard_corpus
from test_data_loader_faults import corrupt_copy
from train_helpers import TINY, describe, losses, metrics, run_local, spawn_ranks, train_env

from vldm.checkpoint import complete_checkpoints
from vldm.config import Config, build_config
from vldm.config.data import SyntheticConfig
from vldm.data import build_loader
from vldm.data.synthetic import write_corpus
from vldm.eval.wandb_reader import history

pytestmark = pytest.mark.faults
STEPS = 8
KINDS = ("mp4", "cut", "json")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tiny base model with a VAE (factor 2) and 16 videos x 2 clips = 32 samples in 4 shards: 16 per
    rank, so 8 steps x grad_accum 2 x batch 1 are exactly one epoch of a rank with nothing skipped."""
    from vldm.models.base import build_tiny_base

    root = tmp_path_factory.mktemp("train_faults")
    base = build_tiny_base(root / "base", vae_channels=(8, 8))
    write_corpus(SyntheticConfig(output=str(root / "videos"), count=16, size="32", frames=16, fps=8, seed=5))
    shard_corpus(root / "videos", root / "shards", videos_per_shard=4, frames=8, fps=8, size="32")
    return {"root": root, "base": base, "shards": root / "shards"}


def overrides(data: dict, shards: Path | str, run: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run}",
        f"model.pretrained={data['base']}",
        f"data.shards={shards}",
        "data.size=32",
        "data.num_frames=4",
        "data.frame_stride=2",
        "data.batch_size=1",
        "data.num_workers=2",
        "data.shuffle_buffer=4",
        "data.pixel_dtype=uint8",
        "data.retry_backoff_s=0.05",
        "train.grad_accum=2",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "checkpoint.every=100",
        "deepspeed.timeout_s=120",
        *extra,
    ]


def rank_orders(data: dict, n: int) -> list[list[str]]:
    """The first n batch keys of each rank's loader on the clean shards, as the runs configure it."""
    cfg = build_config(Config, [str(TINY)], overrides(data, data["shards"], data["root"] / "unused"))
    return [
        [b["keys"][0] for b in _take(build_loader(cfg.data, rank=r, world_size=2, seed=cfg.seed), n)] for r in (0, 1)
    ]


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


REFERENCE = textwrap.dedent("""
    # ranks fed the clean shards' order with some samples taken out of it: what the loader must give
    import os, sys
    from vldm.config import Config, build_config
    from vldm.data import build_loader
    from vldm.train.trainer import train

    class WithoutSamples:
        # batch 1: rank batch g comes from loader worker g % K, so "the order without a sample" is
        # each worker's stream without it
        def __init__(self, loader, drop, k):
            self.it, self.drop, self.k = iter(loader), drop, k
            self.queues, self.pulled, self.made = [[] for _ in range(k)], 0, 0

        def __iter__(self):
            return self

        def __next__(self):
            w = self.made % self.k
            while not self.queues[w]:
                b = next(self.it)
                if b["keys"][0] not in self.drop:
                    self.queues[self.pulled % self.k].append(b)
                self.pulled += 1
            self.made += 1
            return self.queues[w].pop(0)

    cfg = build_config(Config, [sys.argv[1]], sys.argv[2:])
    rank = int(os.environ["RANK"])
    loader = build_loader(cfg.data, rank=rank, world_size=2, seed=cfg.seed)
    sys.exit(train(cfg, source=WithoutSamples(loader, set(os.environ["DROP"].split(",")), cfg.data.num_workers)))
""")


def test_corrupt_samples_on_one_rank_reach_max_steps_with_the_losses_of_the_order_without_them(data, tmp_path):
    order = rank_orders(data, 2 * STEPS + 8)
    broken = dict(zip((order[1][1], order[1][4], order[1][6]), KINDS))  # early in rank 1's epoch 0
    assert not set(broken) & set(order[0][: 2 * STEPS])  # rank 0 never meets them
    bad = corrupt_copy(data["shards"], tmp_path / "bad", broken)
    run = tmp_path / "run"
    env = train_env(tmp_path, wandb=True)
    proc = run_local(run, *overrides(data, bad, run, "wandb.mode=offline"), nproc=2, env=env, timeout=420)
    assert proc.returncode == 0, describe(proc)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))  # every step, collectives aligned throughout
    last = [m for m in metrics(run) if "train/loss" in m][-1]
    assert last["data/corrupt_samples"] == 3
    assert (last["data/corrupt/decode_error"], last["data/corrupt/bad_json"]) == (2, 1)
    # rank 0 drew exactly its epoch, rank 1 its epoch and the 3 samples it skipped: (16 + 19) / 2 / 16
    assert last["data/epoch"] == pytest.approx((16 + 19) / 32)
    for key, kind in broken.items():
        reason = "bad_json" if kind == "json" else "decode_error"
        assert f"skipped corrupt sample {key} ({reason})" in proc.stderr + proc.stdout
    files = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [r for f in files for r in history(f) if "data/corrupt_samples" in r]
    assert rows and rows[-1]["data/corrupt_samples"] == 3 and rows[-1]["data/corrupt/bad_json"] == 1

    # the reference: the clean shards' order without those samples, through the same trainer
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE)
    ref = tmp_path / "ref"
    ref_env = {**train_env(tmp_path), "DROP": ",".join(broken)}
    argv = [str(script), str(TINY), *overrides(data, data["shards"], ref, "wandb.mode=disabled")]
    procs = spawn_ranks(argv, 2, ref_env, tmp_path)
    codes = [p.wait(timeout=420) for p in procs]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-4000:] + (tmp_path / "rank1.log").read_text()[-3000:]
    assert losses(ref) == losses(run)  # bit for bit: nothing zero-filled or substituted was trained on


FLAKY_PIPE = """#!/bin/bash
# $1 shard: its 3rd read (of all ranks' and workers' reads) writes part of it and fails, as a download
# the network cut would; every other read is whole
exec 9>"$1.count.lock"; flock 9
n=$(( $(cat "$1.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$1.count"
flock -u 9
if [ $n -eq 3 ]; then head -c 30000 "$1"; exit 1; fi
cat "$1"
"""


def test_corrupt_samples_on_every_rank_and_a_flaky_pipe_resume_on_the_uninterrupted_trajectory(data, tmp_path):
    order = rank_orders(data, 8)
    broken = dict(zip((order[0][0], order[1][2], order[0][3]), KINDS))  # both ranks, before the stop at step 3
    bad = corrupt_copy(data["shards"], tmp_path / "bad", broken)
    script = tmp_path / "fetch.sh"
    script.write_text(FLAKY_PIPE)

    def piped(tag: str) -> str:
        # a private copy per run, so each run's reads are counted (and fail) on their own
        d = tmp_path / tag
        d.mkdir()
        tars = sorted(bad.glob("*.tar"))
        for t in tars:
            (d / t.name).write_bytes(t.read_bytes())
        return "::".join(f"pipe:bash {script} {d / t.name}" for t in tars)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    first = run_local(whole, *overrides(data, piped("a"), whole, "wandb.mode=disabled"), nproc=2, timeout=420)
    assert first.returncode == 0, describe(first)
    stopped = run_local(
        cut, *overrides(data, piped("b"), cut, "wandb.mode=disabled", "train.stop_after_steps=3"), nproc=2, timeout=420
    )
    assert stopped.returncode == 75, describe(stopped)
    state = json.loads((complete_checkpoints(cut)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 3
    loaders = state["loader"]
    assert [sum(map(sum, s["consumed"])) for s in loaders] == [6 + 2, 6 + 1]  # each rank at its own place
    assert all(s["stats"]["corrupt"] for s in loaders)  # both skipped samples before the stop
    resumed = run_local(cut, *overrides(data, piped("c"), cut, "wandb.mode=disabled"), nproc=2, timeout=420)
    assert resumed.returncode == 0, describe(resumed)
    assert "resuming from" in resumed.stdout
    assert losses(cut) == losses(whole) and sorted(losses(whole)) == list(range(1, STEPS + 1))
    last = [m for m in metrics(whole) if "train/loss" in m][-1]
    assert last["data/corrupt_samples"] >= 3
    assert "failed" in first.stderr and "retry 1/5" in first.stderr  # the cut download was read again
    assert [m for m in metrics(cut) if "train/loss" in m][-1]["data/corrupt_samples"] == last["data/corrupt_samples"]
