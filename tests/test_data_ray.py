"""The sharder on a real Ray cluster: `ray job submit`, bad input, rerun, retry, kill -9, latent actors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import RAY_GCS

from vldm.config.data import DataConfig, SyntheticConfig
from vldm.data import build_loader
from vldm.data.codec import decode_all
from vldm.data.synthetic import write_corpus, write_test_corpus
from vldm.data.tario import read_all

ROOT = Path(__file__).resolve().parents[1]
SHARD = str(ROOT / "data_prep" / "shard_videos.py")
BIN = Path(sys.executable).parent


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def shard_cmd(*args: str) -> list[str]:
    """The sharder run directly (not through `ray job submit`), on this session's Ray by its address: left to
    "auto", Ray picks the cluster recorded in /tmp/ray/ray_current_cluster, under `pytest -n 2` possibly one the
    other worker started (and may stop mid-run), whose tasks the kill test would neither find nor be allowed to kill."""
    return [sys.executable, SHARD, *args, "--ray-address", RAY_GCS]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def all_samples(out: Path) -> list[tuple[str, dict]]:
    return [s for p in sorted(out.glob("*.tar")) for s in read_all(str(p))]


def check_consistent(out: Path) -> list[str]:
    """Every shard's tar, manifest, done marker and the index agree; returns all keys (in order)."""
    index = {s["name"]: s for s in json.loads((out / "_shards.json").read_text())["shards"]}
    keys = []
    for tar in sorted(out.glob("*.tar")):
        tar_keys = [k for k, _ in read_all(str(tar))]
        manifest = [json.loads(line)["key"] for line in tar.with_suffix(".manifest.jsonl").read_text().splitlines()]
        done = json.loads(tar.with_suffix(".done.json").read_text())
        assert tar_keys == manifest and done["samples"] == len(tar_keys) == index[tar.name]["samples"]
        keys += tar_keys
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or "journal" in p.name]
    return keys


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """12 synthetic videos (2 clips each) + the awkward/broken corpus (expected outcome per file)."""
    d = tmp_path_factory.mktemp("mixed") / "in put"  # a space in the directory too
    write_corpus(SyntheticConfig(output=str(d), count=12, size="32", frames=16, fps=8, seed=2))
    expected = {f"syn_{i:05d}.mp4": "ok" for i in range(12)}
    expected.update(write_test_corpus(d))
    return d, expected


def _tiny_models(root: Path) -> tuple[Path, Path]:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    vae.save_pretrained(root / "vae")
    # a byte-level BPE vocabulary with no merges: enough for a real CLIPTokenizer
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{c: 2 + i for i, c in enumerate(chars)},
        **{c + "</w>": 258 + i for i, c in enumerate(chars)},
    }
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(root / "vocab.json"), merges_file=str(root / "merges.txt"), model_max_length=12)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    te.save_pretrained(root / "te")
    tok.save_pretrained(root / "te")
    return root / "vae", root / "te"


def test_ray_job_submit_bad_input_latents_rerun_and_retry(ray_cluster, mixed, tmp_path):
    """One `ray job submit` run over good, awkward and broken files, with the latent actor stage."""
    import torch
    from diffusers import AutoencoderKL

    src, expected = mixed
    vae_dir, te_dir = _tiny_models(tmp_path)
    out = tmp_path / "out"
    opts = [
        "--frames",
        "8",
        "--fps",
        "8",
        "--size",
        "32",
        "--videos-per-shard",
        "8",
        "--extensions",
        "mp4,mkv,webm,avi",
        "--log-every",
        "1",
    ]
    latent_opts = [
        "--encode-latents",
        "--vae",
        str(vae_dir),
        "--text-encoder",
        str(te_dir),
        "--latent-batch",
        "4",
        "--latent-dtype",
        "float32",
    ]
    job = run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_cluster,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "data_prep/shard_videos.py",
            str(src),
            str(out),
            *opts,
            *latent_opts,
        ]
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert (
        "clips/s" in job.stdout and "ETA" in job.stdout and "latents 5/5 shards" in job.stdout
    )  # progress in the job log

    stats = json.loads((out / "_stats.json").read_text())
    bad = Counter(v for v in expected.values() if v != "ok")
    assert stats["inputs"]["seen"] == len(expected) and stats["inputs"]["failed_by_reason"] == dict(bad)
    assert stats["inputs"]["ok"] == len(expected) - sum(bad.values())
    assert stats["shards"] == {"total": 5, "complete": 5, "with_latents": 5, "incomplete": []}
    keys = check_consistent(out)
    assert len(keys) == len(set(keys)) == stats["clips"] == 12 * 2 + 16  # synthetic + awkward-but-good files
    assert stats["run"]["clips_per_s"] > 0 and stats["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert {Path(f["path"]).name: f["reason"] for f in failed} == {k: v for k, v in expected.items() if v != "ok"}

    # latents: the VAE posterior mean x scaling_factor of every frame, as the same from_pretrained path gives
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    for key, m in all_samples(out)[::7]:
        meta = json.loads(m["json"])
        z = np.load(io.BytesIO(m["latents.npy"]))
        assert z.shape == (4, 8, 16, 16) == tuple(meta["latents"]["shape"])
        assert meta["latents"]["scaling_factor"] == 0.5 and meta["latents"]["vae"] == str(vae_dir)
        x = torch.from_numpy(decode_all(m["mp4"])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            ref = (vae.encode(x).latent_dist.mean * 0.5).permute(1, 0, 2, 3).numpy()
        assert np.allclose(z, ref, atol=1e-4)
        assert np.load(io.BytesIO(m["text.npy"])).shape == (12, 16)
    # training reads pixels, or straight from latents
    cfg = DataConfig(shards=str(out), num_frames=4, frame_stride=2, size=32, batch_size=3)
    batch = next(iter(build_loader(cfg, seed=0)))
    assert batch["pixels"].shape == (3, 3, 4, 32, 32)
    batch = next(iter(build_loader(replace(cfg, use_latents=True), seed=0)))
    assert (
        batch["latents"].shape == (3, 4, 4, 16, 16)
        and batch["text_embeds"].shape == (3, 12, 16)
        and "pixels" not in batch
    )

    # rerun (standalone, same options): a no-op that does not even start Ray
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(shard_cmd(str(src), str(out), *opts, *latent_opts))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert json.loads((out / "_stats.json").read_text())["run"]["shards_written"] == 0
    # other settings into the same output are refused, naming the option
    other = run(shard_cmd(str(src), str(out), *opts[:-2], "--fps", "4"))
    assert other.returncode != 0 and "--fps" in other.stdout + other.stderr

    # a retry needs its own output: the plan of this one is fixed
    wrong = run(shard_cmd(str(out / "failed.jsonl"), str(out), *opts))
    assert wrong.returncode == 2 and "own OUTPUT" in wrong.stdout
    # retry the failures alone: failed.jsonl is an input; they fail again, for the same reasons
    retry = run(shard_cmd(str(out / "failed.jsonl"), str(tmp_path / "retry"), *opts))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    again_failed = [json.loads(line) for line in (tmp_path / "retry" / "failed.jsonl").read_text().splitlines()]
    assert sorted((f["path"], f["reason"]) for f in again_failed) == sorted((f["path"], f["reason"]) for f in failed)
    assert not any(
        p.name.startswith("PWNED") for p in list(src.iterdir()) + list(ROOT.iterdir()) + list(Path.cwd().iterdir())
    )


def _ray_workers(driver: int) -> list[int]:
    """Ray worker processes (busy or idle) of this test's job: of this session's Ray (an ancestor names the GCS
    address) or of a private Ray the driver started; never one of another suite's Ray (`pytest -n 2`: one per
    worker). A full process scan: slow under load, so done once and cached by the caller."""
    ours = re.compile(re.escape(RAY_GCS) + r"(?![0-9])")
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if not " ".join(p.info["cmdline"] or []).startswith("ray::"):
                continue
            if any(a.pid == driver or ours.search(" ".join(a.cmdline())) for a in p.parents()):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _running_write_shard(pid: int) -> bool:
    """Ray retitles a worker `ray::write_shard` while it runs the task (`ray::IDLE` between tasks): one small
    /proc read, fast enough to catch a task that lasts a fraction of a second."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::write_shard")
    except OSError:
        return False


def test_kill_9_of_a_worker_and_the_driver_then_rerun_gives_every_clip_once(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_corpus(SyntheticConfig(output=str(src), count=10, size="64", frames=64, fps=8, seed=5))  # 8 clips each
    opts = [
        "--frames",
        "8",
        "--fps",
        "8",
        "--size",
        "128",
        "--videos-per-shard",
        "1",
        "--workers",
        "1",
        "--log-every",
        "1",
    ]
    driver = subprocess.Popen(
        shard_cmd(str(src), str(out), *opts),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    done = lambda: len(list(out.glob("*.done.json"))) if out.exists() else 0  # noqa: E731
    killed_worker = False
    workers: list[int] = []
    scans: list[tuple[float, int]] = []  # (seconds, workers found): the failure message says what the watch saw
    rescan_at = 0.0
    deadline = time.time() + 120
    # until a shard task was killed mid-way and 4 shards are done, always before the last shard. The job's worker
    # processes are found by a full process scan (seconds at load 20) when none is known alive, else every 5 s;
    # in between their titles are watched cheaply: Ray reuses a worker from task to task (max_calls)
    while time.time() < deadline and (done() < 4 or not killed_worker) and done() < 9 and driver.poll() is None:
        if not killed_worker and done() >= 2:
            workers = [w for w in workers if psutil.pid_exists(w)]
            if not workers or time.time() >= rescan_at:
                t_scan = time.time()
                workers, rescan_at = _ray_workers(driver.pid), time.time() + 5.0
                scans.append((round(time.time() - t_scan, 2), len(workers)))
            for pid in [w for w in workers if _running_write_shard(w)]:  # a shard task mid-way: Ray retries it
                os.kill(pid, signal.SIGKILL)
                killed_worker = True
            if not killed_worker:
                time.sleep(0.002)
                continue
        time.sleep(0.02)
    assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)  # the driver, at once
    driver.wait()
    assert 0 < done() < 10 and killed_worker, (done(), scans[-20:])
    time.sleep(1.0)  # let Ray reap the dead job's workers

    rerun = run(shard_cmd(str(src), str(out), *opts))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    keys = check_consistent(out)
    assert len(keys) == len(set(keys)) == 10 * 8  # every clip exactly once
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["clips"] == 80 and stats["inputs"]["failed"] == 0 and stats["run"]["shards_skipped"] >= 1
    sample = read_all(str(out / "shard-000009.tar"))[3][1]
    assert decode_all(sample["mp4"]).shape == (8, 128, 128, 3)
