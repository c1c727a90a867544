"""The extra corpora and training runs of `make paper`'s upsampler, personalisation and cascade rows.

Each is `data_prep/make_synthetic.py` with options of its own (128 px clips for the x4 upsampler, a colour the
demo's corpus never had for personalisation, 4x the frames and resolution for the cascade's real clips). Those
trained on are sharded as the demo's corpus is: `ray job submit ... data_prep/shard_videos.py` on the local
Ray cluster of scripts/ray_local_up.sh (started here when none answers, stopped by `ray_down` at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

from vldm.local_ray import RAY_ADDRESS, ray_answers, start_local_ray, stop_local_ray


def synthetic(paper, name: str, count: int, size: int, frames: int, seed: int, **options) -> Path:
    """OUT/corpora/NAME: `count` moving-shapes videos (one shape each), once per run directory."""
    out = paper.out / "corpora" / name
    if len(list(out.glob("*.mp4"))) == count:  # the generator is deterministic: same options, same files
        return out
    args = [paper.py, "data_prep/make_synthetic.py", str(out), "--count", str(count), "--size", str(size)]
    args += ["--frames", str(frames), "--fps", "8", "--max-shapes", "1", "--seed", str(seed)]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    paper.run(args, f"corpus_{name}.log")
    return out


def decoded(corpus: Path) -> list[tuple]:
    """(frames (F, H, W, 3) uint8 decoded with PyAV, sidecar) of every video of a corpus, in name order."""
    from vldm.data.codec import decode_all

    return [(decode_all(str(p)), json.loads(p.with_suffix(".json").read_text())) for p in sorted(corpus.glob("*.mp4"))]


def shards(paper, corpus: Path, name: str, size: int, frames: int) -> Path:
    """OUT/shards/NAME: WebDataset shards of `frames`-frame clips of `corpus` at `size` px, by a Ray job."""
    out = paper.out / "shards" / name
    if (out / "_stats.json").exists() and list(out.glob("*.tar")):
        return out
    if not ray_answers():
        start_local_ray(paper.env)
        paper.started_ray = True
        paper.say(f"  started a local Ray head ({RAY_ADDRESS})")
    # a job's driver gets the cluster's environment, not ours: W&B's settings are passed explicitly
    env_vars = {k: v for k, v in paper.env.items() if k.startswith("WANDB_")}
    job = ["ray", "job", "submit", "--address", RAY_ADDRESS, "--working-dir", ".", "--runtime-env-json"]
    job += [json.dumps({"env_vars": env_vars}), "--", "python", "data_prep/shard_videos.py", str(corpus), str(out)]
    job += ["--frames", str(frames), "--fps", "8", "--size", str(size), "--clip-stride", str(frames)]
    job += ["--samples-per-shard", "64", "--workers", "2", "--crf", "12"]
    paper.run(job, f"shards_{name}.log", timeout=900)
    return out


def ray_down(paper) -> None:
    """Stop the Ray cluster `shards` started (a private one by its ports alone: `ray stop` stops them all)."""
    if getattr(paper, "started_ray", False):
        stop_local_ray(paper.env)
        paper.started_ray = False


def train_run(paper, config: str, name: str, steps: int, overrides: list[str]) -> Path:
    """OUT/runs/NAME: `config` + `overrides` for `steps` steps through slurm/train_temporal.sbatch (bash:
    plan.ranks local ranks, DeepSpeed ZeRO-2), W&B offline; kept with --reuse-runs when it has exactly `steps`
    steps."""
    import shutil

    run = paper.out / "runs" / name
    if paper.reuse_runs and paper.trained(run, steps):
        paper.say(f"  reusing {run} ({steps} steps, --reuse-runs)")
        return run
    shutil.rmtree(run, ignore_errors=True)
    every = max(1, min(25, steps // 10))
    paper.run(
        ["bash", "slurm/train_temporal.sbatch", config, f"run_dir={run}", *overrides, f"train.max_steps={steps}"]
        + [f"checkpoint.every={steps}", f"train.log_every={every}", f"optim.warmup_steps={max(1, min(20, steps // 8))}"]
        + ["wandb.mode=offline"],
        f"3_{name}.log",
    )
    return run
