"""Where the per-head cost of temporal attention goes on CPU (issue 16 item 8).

The temporal self-attention of a level at 32x32 latents and 8 frames is (1024 positions) x heads x 8 frames
x head dim. This times forward + backward of that attention at the same channel count (heads x dim fixed)
with few large heads and many tiny ones, through torch SDPA as `vldm.models.attention` calls it and through
the alternatives one might try: q/k/v made contiguous first, heads folded into the batch, and explicit
batched matmuls (bmm + softmax). Median of `--iters` timings, 1 thread.

    python bench/bench_heads.py [--positions 1024 --frames 8 --iters 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange


def sdpa(q, k, v, h):
    q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=h) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "n h s d -> n s (h d)")


def sdpa_contiguous(q, k, v, h):
    q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=h).contiguous() for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "n h s d -> n s (h d)")


def heads_in_batch(q, k, v, h):
    q, k, v = (rearrange(t, "n s (h d) -> (n h) 1 s d", h=h) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "(n h) 1 s d -> n s (h d)", h=h)


def bmm(q, k, v, h):
    d = q.shape[-1] // h
    q, k, v = (rearrange(t, "n s (h d) -> (n h) s d", h=h) for t in (q, k, v))
    a = torch.bmm(q, k.transpose(1, 2)).mul_(d**-0.5).softmax(-1)
    return rearrange(torch.bmm(a, v), "(n h) s d -> n s (h d)", h=h)


VARIANTS = {"sdpa (ours)": sdpa, "sdpa contiguous": sdpa_contiguous, "heads in batch": heads_in_batch, "bmm": bmm}


def time_ms(fn, n: int, s: int, h: int, d: int, iters: int) -> float:
    x = torch.randn(n, s, 3 * h * d, requires_grad=True)
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        fn(*x.chunk(3, -1), h).sum().backward()
        if i:  # the first call warms up the allocator and kernels
            times.append(time.perf_counter() - t0)
        x.grad = None
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=1024, help="batch of the temporal attention (b*h*w)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--iters", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    layouts = [(64, 2), (64, 8), (256, 8), (256, 32)]  # (channels, heads): SVD-like vs tiny heads
    print(f"{'channels':>8} {'heads':>5} {'dim':>4} " + " ".join(f"{v:>16}" for v in VARIANTS) + "   (ms, fwd+bwd)")
    for c, h in layouts:
        row = [time_ms(fn, a.positions, a.frames, h, c // h, a.iters) for fn in VARIANTS.values()]
        print(f"{c:>8} {h:>5} {c // h:>4} " + " ".join(f"{t:>16.1f}" for t in row), flush=True)


if __name__ == "__main__":
    main()
