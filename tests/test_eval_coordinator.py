"""The pool's coordination on disk, run in-process (LocalExecutor): once per checkpoint, newest first,
finished work never redone, a lost shard redone, failures recorded, W&B logged exactly once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import (
    TinyI3D,
    TinyInception,
    add_checkpoint,
    make_tiny_run,
    save_tiny_clip,
    save_torchscript,
    write_real_videos,
)

from vldm.eval.coordinator import Coordinator, LocalExecutor
from vldm.eval.layout import SHARDS, VIDEOS, SuiteBusy, SuiteLock
from vldm.eval.report import main as report_main
from vldm.eval.suite import load_suite
from vldm.eval.worker import EvalWorker

FAST = [
    "sampling.num_samples=4",
    "sampling.steps=2",
    "val_loss.num_clips=2",
    "val_loss.timesteps=[100,700]",
    "pool.shard_size=2",
    "pool.poll_interval_s=0.05",
    "wandb.enabled=false",
]


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def run(pristine_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(pristine_run, dst)  # copy2 keeps mtimes: checkpoint fingerprints stay valid
    return dst


@pytest.fixture(scope="module")
def evaluated(pristine_run, tmp_path_factory):
    """The tiny run evaluated once (both checkpoints, both variants): (run dir, coordinator, tasks run)."""
    dst = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(pristine_run, dst)
    coord, ex, failed = _evaluate(dst)
    assert failed == 0
    return dst, coord, ex.ran


@pytest.fixture()
def run_done(evaluated, tmp_path) -> Path:
    dst = tmp_path / "run_done"
    shutil.copytree(evaluated[0], dst)
    return dst


class CountingExecutor(LocalExecutor):
    """LocalExecutor that records what it ran and can run a hook after each task."""

    def __init__(self, coord: Coordinator, fail=lambda t: False, after=lambda n: None):
        super().__init__(lambda: EvalWorker(coord.run_dir, coord.suite, coord.suite_hash, threads=1))
        self.ran, self.fail, self.after = [], fail, after

    def wait(self, timeout):
        task = self._task
        if task is not None and self.fail(task):
            self._task = None
            from vldm.eval.coordinator import Outcome

            return [Outcome(task, False, error="RuntimeError: injected failure\n")]
        out = super().wait(timeout)
        if task is not None:
            self.ran.append(task.name)
            self.after(len(self.ran))
        return out


def _evaluate(run: Path, overrides=(), **kw) -> tuple[Coordinator, CountingExecutor, int]:
    coord = Coordinator(run, load_suite(None, [*FAST, *overrides]), log=lambda m: None)
    ex = CountingExecutor(coord, **kw)
    once = kw.pop("once", True) if "once" in kw else True
    with SuiteLock(coord.dir):
        failed = coord.run(ex, once=once)
    return coord, ex, failed


def _results(coord: Coordinator) -> dict[int, dict]:
    return {json.loads(p.read_text())["step"]: json.loads(p.read_text()) for p in coord.dir.glob("step_*/result.json")}


def test_each_checkpoint_once_newest_first_and_rerun_does_nothing(evaluated, run_done, capsys):
    _, coord, ran = evaluated
    assert coord.finished == [200, 100]  # newest first
    assert ran[0].startswith("step_00000200/") and len(ran) == len(set(ran)) == 12
    res = _results(coord)
    assert sorted(res) == [100, 200]
    for r in res.values():
        assert {"ema/flicker", "raw/flicker", "ema/consistency", "ema/val_loss", "raw/val_loss_t700"} <= set(
            r["metrics"]
        )
        step = coord.dir / Path(r["checkpoint"]).name
        assert len(r["videos"]["ema"]) == 4 and (step / r["videos"]["ema"][0]["path"]).exists()
        assert (step / "first_frames_ema.png").exists()
        assert r["protocol"]["protocol_version"] == 1 and r["resolved"]["num_frames"] == 4
    files = [p for p in run_done.joinpath("eval").rglob("*") if p.is_file() and p.name != ".lock"]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    coord2, ex2, _ = _evaluate(run_done)
    assert ex2.ran == [] and coord2.finished == []
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    # a temp dir being written by the trainer is ignored
    (run_done / "checkpoints" / ".tmp-step_00000300").mkdir()
    assert _evaluate(run_done)[1].ran == []
    assert report_main([str(run_done)]) == 0
    out = capsys.readouterr().out
    assert "ema/flicker" in out and " 100 " in out and " 200 " in out


def test_a_lost_shard_is_redone_alone_and_gives_the_same_result(run_done):
    coord, _, _ = _evaluate(run_done)
    before = _results(coord)[200]["metrics"]
    step = coord.dir / "step_00000200"
    (step / "result.json").unlink()  # as if the coordinator died before merging ...
    (step / SHARDS / "raw_samples_000002-000004.npz").unlink()  # ... and a worker died mid-shard
    (step / SHARDS / ".raw_samples_000002-000004.npz.x1y2.tmp").write_bytes(b"half")  # mid-write
    coord2, ex, _ = _evaluate(run_done)
    assert ex.ran == ["step_00000200/raw_samples_000002-000004"]
    assert _results(coord2)[200]["metrics"] == pytest.approx(before, rel=1e-9)
    assert not list((step / SHARDS).glob(".*"))  # the half-written file was cleaned up


def test_a_worker_killed_mid_write_leaves_nothing_once_its_shard_is_retried(run):
    """What a SIGKILL between a temp file's creation and its rename leaves (the partial's mkstemp name,
    an mp4 being encoded), mid-job: the shard's next attempt removes it, and no temp file is left."""
    victim = "step_00000200/raw_samples_000002-000004"

    def killed(task) -> bool:
        if task.name != victim or (Path(task.out).parent / "killed").exists():
            return False
        out = Path(task.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f".{out.name}.k9w2x1.tmp").write_bytes(b"half an npz")
        vdir = out.parent.parent / VIDEOS / "raw"
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / ".000003.mp4.tmp.mp4").write_bytes(b"half an mp4")
        (out.parent / "killed").touch()
        return True

    seen_after_retry = []

    def after(_n: int) -> None:
        if ex.ran[-1] == victim:  # the retry itself cleaned up, before its checkpoint's job ended
            seen_after_retry.extend(p.name for p in (run / "eval").rglob("*") if ".tmp" in p.name)

    coord = Coordinator(run, load_suite(None, FAST), log=lambda m: None)
    ex = CountingExecutor(coord, fail=killed, after=after)
    with SuiteLock(coord.dir):
        failed = coord.run(ex, once=True)
    assert failed == 0 and ex.ran.count(victim) == 1 and sorted(_results(coord)) == [100, 200]
    assert seen_after_retry == []
    (coord.dir / "step_00000200" / SHARDS / "killed").unlink()
    left = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert left == [], left


def test_rewritten_checkpoint_weights_invalidate_its_partials(run_done):
    coord = Coordinator(run_done, load_suite(None, FAST), log=lambda m: None)
    (coord.dir / "step_00000100" / "result.json").unlink()
    ema = run_done / "checkpoints" / "step_00000100" / "temporal_ema.safetensors"
    ema.write_bytes(ema.read_bytes())  # same bytes, new mtime: the fingerprint no longer matches
    _, ex, _ = _evaluate(run_done)
    assert sorted(ex.ran) == [
        "step_00000100/ema_samples_000000-000002",
        "step_00000100/ema_samples_000002-000004",
        "step_00000100/ema_val_loss_000000-000002",
    ]


def test_shard_layout_does_not_change_the_numbers(evaluated, tmp_path):
    _, coord, _ = evaluated
    other = tmp_path / "other"
    shutil.copytree(evaluated[0], other, ignore=shutil.ignore_patterns("eval", "step_00000100"))
    coord2, _, _ = _evaluate(other, ["pool.shard_size=3", "pool.batch_size=1"])
    assert coord2.suite_hash == coord.suite_hash  # pool settings are not protocol
    # same seeds per sample whatever the shard or batch; only float round-off of batched kernels differs
    assert _results(coord2)[200]["metrics"] == pytest.approx(_results(coord)[200]["metrics"], rel=1e-3)


def test_a_failing_shard_fails_its_checkpoint_only_and_a_rerun_retries(run_done, capsys):
    sdir = next(run_done.joinpath("eval").iterdir()) / "step_00000100"
    (sdir / "result.json").unlink()
    shutil.rmtree(sdir / SHARDS)
    coord, ex, failed = _evaluate(run_done, ["pool.max_attempts=2"], fail=lambda t: t.key == "step_00000100")
    assert failed == 1 and sorted(_results(coord)) == [200]
    err = json.loads((sdir / "error.json").read_text())
    assert err["attempts"] == 2 and "injected failure" in err["error"]
    report_main([str(run_done)])
    assert "failed:  step_00000100" in capsys.readouterr().out
    coord2, _, failed2 = _evaluate(run_done)
    assert failed2 == 0 and sorted(_results(coord2)) == [100, 200]
    assert not (sdir / "error.json").exists()


def test_one_coordinator_per_run_and_suite(run):
    coord = Coordinator(run, load_suite(None, FAST), log=lambda m: None)
    with SuiteLock(coord.dir):
        with pytest.raises(SuiteBusy, match="another eval pool"):
            SuiteLock(coord.dir).__enter__()
    with SuiteLock(coord.dir):  # released on exit
        pass


def test_polling_picks_up_new_checkpoints(run):
    from vldm.models.base import build_video_unet, load_components

    coord = Coordinator(
        run,
        load_suite(None, [*FAST, "pool.idle_exit_s=0.5", "sampling.variants=[ema]", "val_loss.enabled=false"]),
        log=lambda m: None,
    )
    model = build_video_unet(coord.run_cfg.model, load_components(coord.run_cfg.model))
    added = []

    def after(n):
        if n == 1:  # training saves a checkpoint while the pool works
            added.append(add_checkpoint(run, model, 300, seed=3))

    ex = CountingExecutor(coord, after=after)
    with SuiteLock(coord.dir):
        assert coord.run(ex, once=False) == 0
    assert added and sorted(_results(coord)) == [100, 200, 300]
    assert coord.finished == [300, 200, 100]  # the new checkpoint overtook the older queued work


def test_fvd_fid_clipsim_with_cached_reference_statistics(run, tmp_path):
    real = write_real_videos(tmp_path / "real", 5, frames=16, size=24)
    (real / "broken.mp4").write_bytes(b"not a video")  # counted and skipped, not fatal
    i3d = save_torchscript(TinyI3D, tmp_path / "i3d.pt")
    inc = save_torchscript(TinyInception, tmp_path / "inception.pt")
    clip = save_tiny_clip(tmp_path / "clip")
    over = [
        "sampling.num_frames=16",
        "sampling.variants=[ema]",
        "val_loss.enabled=false",
        "fvd.enabled=true",
        f"fvd.weights={i3d}",
        "fid.enabled=true",
        f"fid.weights={inc}",
        "fid.num_frames=2",
        "clipsim.enabled=true",
        f"clipsim.model_dir={clip}",
        f"real.videos={real}",
        f"pool.reference_cache={tmp_path / 'cache'}",
    ]
    shutil.rmtree(run / "checkpoints" / "step_00000100")
    coord, ex, failed = _evaluate(run, over)
    assert failed == 0
    assert [t for t in ex.ran if "reference" in t][:1] == ex.ran[:1]  # reference statistics first
    m = _results(coord)[200]
    assert m["metrics"]["ema/fvd_fake4_real5"] >= 0 and m["metrics"]["ema/fid_fake8_real10"] >= 0
    assert -1 <= m["metrics"]["ema/clipsim"] <= 1
    fvd = m["details"]["ema/fvd_fake4_real5"]
    assert fvd["n_fake"] == 4 and fvd["n_real"] == 5 and fvd["real_skipped"] == 1
    assert fvd["extractor"]["frames"] == 16 and len(fvd["extractor"]["sha256"]) == 64
    assert any("N=4 < feature dim 400" in w for w in fvd["warnings"])
    # the cached real statistics are reused by the next run with the same protocol
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("eval"))
    coord2, ex2, _ = _evaluate(other, over)
    assert not any("reference" in t for t in ex2.ran)
    assert _results(coord2)[200]["metrics"] == pytest.approx(m["metrics"], rel=1e-6)


def test_validation_loss_on_held_out_tar_shards(run, tmp_path):
    import tarfile

    from vldm.eval.tasks import ShardTask, read_partial

    src = write_real_videos(tmp_path / "src", 3, frames=6, size=24)
    with tarfile.open(tmp_path / "heldout-000000.tar", "w") as tf:
        for i, p in enumerate(sorted(src.glob("*.mp4"))):
            tf.add(p, arcname=f"clip{i}.mp4")
    suite = load_suite(None, [*FAST, f"val_loss.data={tmp_path / 'heldout-000000.tar'}", "val_loss.num_clips=3"])
    coord = Coordinator(run, suite, log=lambda m: None)
    assert len(coord.protocol["val_loss"]["data"]) == 64  # the held-out listing is part of the protocol
    worker = EvalWorker(run, suite, coord.suite_hash, threads=1)
    ck = run / "checkpoints" / "step_00000100"

    def task(a, b, name):
        return ShardTask("val_loss", ck.name, a, b, str(tmp_path / name), variant="ema", ckpt=str(ck), step=100)

    worker.run(task(0, 3, "all.npz"))
    worker.run(task(1, 3, "part.npz"))
    full, part = read_partial(tmp_path / "all.npz")[1]["val_loss"], read_partial(tmp_path / "part.npz")[1]["val_loss"]
    assert full.shape == (3, 2) and (full > 0).all()
    np.testing.assert_allclose(part, full[1:], rtol=1e-5)  # fixed noise per (clip, t): shard-independent
