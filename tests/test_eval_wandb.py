"""W&B offline: eval/* against trainer/global_step, mp4 samples and a first-frame grid, logged once."""

from __future__ import annotations

import shutil

from eval_helpers import make_tiny_run

from vldm.eval.coordinator import Coordinator, LocalExecutor
from vldm.eval.layout import SuiteLock
from vldm.eval.suite import load_suite
from vldm.eval.wandb_log import NullLogger, WandbLogger, eval_run_id, make_logger
from vldm.eval.wandb_reader import history, metric_definitions, run_info
from vldm.eval.worker import EvalWorker

FAST = [
    "sampling.num_samples=2",
    "sampling.steps=1",
    "sampling.variants=[ema]",
    "val_loss.num_clips=1",
    "val_loss.timesteps=[500]",
    "pool.shard_size=2",
    "wandb.log_videos=2",
]


def _evaluate(run, overrides=()):
    suite = load_suite(None, [*FAST, *overrides])
    coord = Coordinator(run, suite, log=lambda m: None)
    coord.logger = make_logger(suite.wandb, coord.run_dir, suite.name, coord.suite_hash, coord.protocol, coord.run_cfg)
    ex = LocalExecutor(lambda: EvalWorker(coord.run_dir, suite, coord.suite_hash, threads=1))
    with SuiteLock(coord.dir):
        coord.run(ex, once=True)
    coord.logger.finish()
    return coord


def test_offline_run_has_eval_metrics_videos_and_grid(tmp_path, wandb_offline):
    run = make_tiny_run(tmp_path, overrides=["wandb.group=exp1", "wandb.project=videoldm"])
    coord = _evaluate(run)
    assert isinstance(coord.logger, WandbLogger)
    files = list(wandb_offline.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    info = run_info(files[0])
    # beside the training run: its group and project
    assert (info["job_type"], info["group"], info["project"]) == ("eval", "exp1", "videoldm")
    assert info["id"] == eval_run_id("exp1", run, coord.suite_hash) == coord.logger.run_id  # deterministic
    assert metric_definitions(files[0])["eval/*"] == "trainer/global_step"
    rows = history(files[0])
    assert sorted(r["trainer/global_step"] for r in rows) == [100, 200]
    for r in rows:
        assert {"eval/ema/flicker", "eval/ema/consistency", "eval/ema/val_loss"} <= set(r)
        videos = r["eval/ema/samples/videos"]
        assert len(videos) == 2 and all(v["_type"] == "video-file" and v["path"].endswith(".mp4") for v in videos)
        assert r["eval/ema/first_frames/_type"] == "image-file"
        for v in videos:
            assert (files[0].parent / "files" / v["path"]).stat().st_size > 0
    # a rerun has nothing to log: no second W&B run, no duplicate points
    shutil.rmtree(files[0].parent)
    _evaluate(run)
    assert list(wandb_offline.glob("wandb/offline-run-*")) == []
    # a result that never reached W&B (coordinator killed after writing it) is logged by the next pool
    next(coord.dir.glob("step_00000100/.wandb-*")).unlink()
    _evaluate(run)
    (f,) = wandb_offline.glob("wandb/offline-run-*/run-*.wandb")
    assert [r["trainer/global_step"] for r in history(f)] == [100]


def test_disabled_wandb_is_a_no_op(tmp_path, wandb_offline):
    cfg = load_suite(None, ["wandb.enabled=false"]).wandb
    assert isinstance(make_logger(cfg, tmp_path, "tiny", "h", {}), NullLogger)
    cfg = load_suite(None, ["wandb.mode=disabled"]).wandb
    assert isinstance(make_logger(cfg, tmp_path, "tiny", "h", {}), NullLogger)
