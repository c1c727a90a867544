"""Sampling cost of every cascade stage on CPU at the tiny config, and of the cascade against key frames alone.

    python bench/bench_sample.py [--steps 10] [--size 32] [--keys 8] [--threads 2] [--json out.json]

Each stage runs in a fresh subprocess (so its peak RSS is its own) on the tiny untrained cascade of
`vldm.sample.tiny` (weights do not change the cost): key frames (the key-frame model on `--keys`
frames), prediction rollout (extending them by one S = 2 chunk), interpolation x4 (keys -> 4 (keys-1)+1),
the video decoder against the image decoder, and the x4 upsampler. Reported: seconds per generated
frame (frames a stage adds), peak RSS, and the cost of the whole cascade (key frames -> x4 interpolation
-> video decoder -> x4 upsampler) per output frame against key frames + image decoder alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _stage(name: str, args: dict, root: str, q) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    from vldm.config.sample import SampleConfig
    from vldm.diffusion import decode_latents
    from vldm.sample import generate, stages
    from vldm.sample.api import encode_prompts
    from vldm.sample.tiny import build_tiny_cascade

    c = build_tiny_cascade(root, clip_frames=args["keys"], size=args["size"])
    cfg = SampleConfig(steps=args["steps"], guidance_scale=7.5, context_guidance=1.5)
    text = encode_prompts(c, c.components, ["a red square moving right"], cfg)
    run = stages.Run(cfg, [0])
    hw = (args["size"] // c.components.vae_scale_factor,) * 2
    keys = args["keys"]
    z = torch.randn(1, 4, keys, *hw)

    cpu = {}

    def timed(fn, repeat: int = args["repeat"]):
        fn()  # warm-up (allocator, kernels)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeat):
            out = fn()
        cpu["s"] = (time.process_time() - c0) / repeat  # CPU seconds: robust when the machine is shared
        return (time.perf_counter() - t0) / repeat, out

    with torch.no_grad():
        if name == "keyframes":
            s, out = timed(lambda: stages.keyframes(c.keyframes, text, run, keys, hw))
            new = keys
        elif name == "rollout":
            s, out = timed(lambda: stages.rollout(c.predictor, text, run, 2 * keys - 2, hw, start=z))
            new = out.shape[2] - keys
        elif name == "interpolation":
            s, out = timed(lambda: stages.interpolate(c.interpolator, text, run, z, 1, 32.0))
            new = out.shape[2] - keys
        elif name == "decoder_video":
            zz = torch.randn(1, 4, 4 * (keys - 1) + 1, *hw)
            s, out = timed(lambda: c.decoder.decode(zz, cfg.decoder_window, cfg.decoder_overlap))
            new = zz.shape[2]
        elif name == "decoder_image":
            zz = torch.randn(1, 4, 4 * (keys - 1) + 1, *hw)
            s, out = timed(lambda: decode_latents(c.components.vae, zz))
            new = zz.shape[2]
        elif name == "upsampler":
            px = torch.rand(1, 3, keys, args["size"], args["size"]) * 2 - 1
            s, out = timed(
                lambda: stages.upsample(c.upsampler, text, run, px, (args["size"],) * 2, c.low_res_scheduler)
            )
            new = keys
        elif name == "cascade":
            s, out = timed(lambda: generate(c, ["a red square"], cfg, num_frames=4 * (keys - 1) + 1, progress=False), 1)
            new = out.videos.shape[2]
        elif name == "keyframes_only":
            s, out = timed(lambda: _keys_only(c, cfg, keys), 1)
            new = keys
        else:
            raise KeyError(name)
    q.put(
        {
            "stage": name,
            "seconds": s,
            "cpu_seconds": cpu["s"],
            "frames": int(new),
            "s_per_frame": s / new,
            "cpu_s_per_frame": cpu["s"] / new,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def _keys_only(c, cfg, keys: int):
    """Key frames decoded by the image decoder: the cascade's baseline (no rollout, interpolation, upsampler)."""
    import dataclasses

    from vldm.sample import generate

    bare = dataclasses.replace(c, predictor=None, interpolator=None, decoder=None, upsampler=None)
    return generate(bare, ["a red square"], cfg, num_frames=keys, progress=False)


STAGES = (
    "keyframes",
    "rollout",
    "interpolation",
    "decoder_image",
    "decoder_video",
    "upsampler",
    "keyframes_only",
    "cascade",
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per stage (default: 10)")
    ap.add_argument("--size", type=int, default=32, help="key-frame pixel size; latents are size/4 (default: 32)")
    ap.add_argument(
        "--keys", type=int, default=8, help="key frames = the models' clip length (default: 8, the paper's)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions after a warm-up (default: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    args = vars(a)
    ctx = mp.get_context("spawn")
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name in STAGES:
            q = ctx.Queue()
            p = ctx.Process(target=_stage, args=(name, args, root, q))
            p.start()
            rows[name] = q.get()
            p.join()
            r = rows[name]
            print(
                f"{name:15s} {r['frames']:4d} frames  wall {r['seconds']:8.2f} s = {r['s_per_frame']:7.3f} s/frame  "
                f"cpu {r['cpu_seconds']:8.2f} s = {r['cpu_s_per_frame']:7.3f} s/frame  peak RSS "
                f"{r['peak_rss_mb']:6.0f} MB",
                flush=True,
            )
    per = {n: r["cpu_s_per_frame"] for n, r in rows.items()}  # ratios of CPU time (the machine may be shared)
    ratios = {
        "rollout_vs_keyframes_per_frame": per["rollout"] / per["keyframes"],
        "interpolation_vs_keyframes_per_frame": per["interpolation"] / per["keyframes"],
        "video_vs_image_decoder": per["decoder_video"] / per["decoder_image"],
        "upsampler_vs_keyframes_per_frame": per["upsampler"] / per["keyframes"],
        "cascade_vs_keyframes_total": rows["cascade"]["cpu_seconds"] / rows["keyframes_only"]["cpu_seconds"],
        "cascade_vs_keyframes_per_output_frame": per["cascade"] / per["keyframes_only"],
    }
    print(f"\nratios of CPU seconds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"steps={a.steps} size={a.size}px (latents {a.size // 4}px) keys={a.keys} threads={a.threads}; "
        f"cascade = {a.keys} key frames -> x4 interpolation ({4 * (a.keys - 1) + 1} frames) -> video decoder -> x4 "
        f"upsampler ({4 * a.size}px)"
    )
    for name, v in ratios.items():
        print(f"{name:40s} {v:6.2f}x")
    result = {"args": args, "stages": rows, "ratios": ratios}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
