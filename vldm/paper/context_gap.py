"""Does a prediction model use its context? Held-out denoising loss on the generated frames with the
context given vs zeroed (the S = 0 input), per noise band.

    python -m vldm.paper.context_gap RUN HELDOUT_DIR [--frames 8] [--ema | --raw]

HELDOUT_DIR holds mp4 + sidecar JSON clips (`data_prep/make_synthetic.py`, e.g. OUT/heldout of `make paper`).
No gap (ratio ~ 1) means the model ignores the context frames: its samples after the context are drawn
anew whatever it is given. The same noise and timesteps are used for both inputs, so the ratio is paired.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vldm.tasks.paper import context_condition, first_frames_mask

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # DDPM timestep bands: low noise .. pure noise


@torch.no_grad()
def context_gap(stage, z: torch.Tensor, text: torch.Tensor, s: int = 2, repeats: int = 4) -> dict:
    """{band: {"context": mse, "no_context": mse, "ratio": no / with}} of the denoising loss on frames s..
    of the clean latents `z` (b, c, f, h, w) with text embeddings `text` (b, l, d)."""
    from diffusers import DDPMScheduler

    model = stage.model
    sched = DDPMScheduler.from_config(stage.scheduler_config)
    b, c, f = z.shape[:3]
    mask = first_frames_mask(torch.full((b,), s), f)
    with_ctx = context_condition(z, mask)
    no_ctx = torch.zeros_like(with_ctx)
    g = torch.Generator().manual_seed(0)
    out = {}
    for lo, hi in BANDS:
        err = {"context": [], "no_context": []}
        for _ in range(repeats):
            t = torch.randint(lo, hi, (b,), generator=g)
            noise = torch.randn(z.shape, generator=g)
            noisy = sched.add_noise(z, noise, t)
            goal = sched.get_velocity(z, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            for name, cond in (("context", with_ctx), ("no_context", no_ctx)):
                pred = model(noisy, t, encoder_hidden_states=text, temporal_cond=cond)
                err[name].append((pred - goal)[:, :, s:].square().mean().item())
        a, n = sum(err["context"]) / repeats, sum(err["no_context"]) / repeats
        out[f"t{lo}-{hi}"] = {"context": round(a, 5), "no_context": round(n, 5), "ratio": round(n / a, 3)}
    return out


def measure(stage, comps, pixels: torch.Tensor, captions: list[str], s: int = 2) -> dict:
    """context_gap of held-out `pixels` (b, 3, f, H, W) in [-1, 1] and their captions, through the run's VAE
    and text encoder."""
    from vldm.diffusion.sampler import encode_pixels
    from vldm.models.base import encode_text

    z = encode_pixels(comps.vae, pixels)
    return context_gap(stage, z, encode_text(comps, captions, z.device, z.dtype), s)


def main(argv: list[str] | None = None) -> int:
    from vldm.data.codec import decode_all
    from vldm.sample.runs import load_stage

    ap = argparse.ArgumentParser(prog="python -m vldm.paper.context_gap", description=__doc__)
    ap.add_argument("run")
    ap.add_argument("heldout")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--context", type=int, default=2, help="context frames S given (default 2)")
    ap.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    clips = sorted(Path(a.heldout).glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no mp4 clips in {a.heldout}")
    stage, comps = load_stage(a.run, ema=not a.raw)
    vids = torch.stack([torch.from_numpy(decode_all(str(p))[: a.frames]) for p in clips])
    pixels = vids.float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()
    captions = [json.loads(p.with_suffix(".json").read_text())["caption"] for p in clips]
    res = measure(stage, comps, pixels, captions, a.context)
    print(json.dumps({"run": a.run, "ema": not a.raw, "clips": len(clips), "S": a.context, "bands": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
