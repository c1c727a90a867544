"""One rank of the EMA-of-fp32-masters check (tests/test_ema_masters.py starts it on 1 or 2 ranks over gloo).

argv: OUT ZERO_STAGE PRECISION STEPS [RESUME_FROM]. A small model with a frozen part goes through the real
`parallelize` (DeepSpeed ZeRO, the project's optimizer and config) and the real EMA; every step the full
fp32 masters are assembled with DeepSpeed's own `safe_get_full_fp32_param`, and two reference EMAs are
kept in fp32 on rank 0: one of the masters, one of the (bf16) module weights. Rank 0 writes OUT/result.pt:
the EMA assembled from the partitions, both references and the masters. With RESUME_FROM (a result.pt of
an earlier run), the EMA is loaded from its assembled EMA first and continued, as a checkpoint resume does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

from vldm.config import Config, build_config
from vldm.train import dist
from vldm.train.ema import EMA
from vldm.train.engine import parallelize

ROOT = Path(__file__).resolve().parents[1]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(16, 16)
        self.temporal = nn.Sequential(nn.Linear(16, 37), nn.SiLU(), nn.Linear(37, 16))  # odd sizes: ragged partitions
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.temporal(self.frozen(x))


def main() -> None:
    out, stage, precision, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    resume = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    accum = 1 if stage == 0 else 2
    world = dist.detect_world()
    dist.export_env(world)
    dist.init_process_group(world, "gloo", 120)
    cfg = build_config(
        Config,
        [str(ROOT / "configs" / "tiny_cpu.yaml")],
        [
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
            "data.batch_size=1",
            # updates of ~1e-4 on weights of ~0.1-1: far below bf16's resolution there (2^-8 relative)
            "optim.lr=1e-4",
            "optim.weight_decay=0",
            "optim.grad_clip=0",
            # 2 micro-batches per step where DeepSpeed accumulates them in fp32 (ZeRO 1/2), 1 at ZeRO 0
            f"train.grad_accum={accum}",
        ],
    )
    torch.manual_seed(0)
    model = Small()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    engine = parallelize(model, cfg, world.world_size, torch.device("cpu"))
    ema = EMA(named, 0.9, engine)
    if resume is not None:
        saved = torch.load(resume)
        ema.load_tensors(saved["ema"])
        ema.num_updates = saved["num_updates"]

    from deepspeed.utils import safe_get_full_fp32_param

    def masters() -> dict[str, torch.Tensor]:
        full = {n: safe_get_full_fp32_param(p) if hasattr(p, "_hp_mapping") else None for n, p in named}
        if precision == "bf16" and stage == 0:  # the bf16 wrapper's fp32 copies, parameters in order
            full = dict(zip(full, engine.optimizer.fp32_groups[0]))
        return {n: (t if t is not None else p.detach()).float().clone() for (n, p), t in zip(named, full.values())}

    ref = masters() if resume is None else {k: v.clone() for k, v in saved["ema"].items()}
    ref_bf16 = {n: p.detach().float().clone() for n, p in named} if resume is None else None
    gen = torch.Generator().manual_seed(100 + world.rank)
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randn(4, 16, generator=gen).to(next(model.parameters()).dtype)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        ema.update()
        m = masters()
        for n, p in named:
            ref[n].lerp_(m[n], 0.1)
            if ref_bf16 is not None:
                ref_bf16[n].lerp_(p.detach().float(), 0.1)
    assembled = ema.full_tensors(keep=world.is_main)  # collective
    if world.is_main:
        result = {
            "ema": assembled,
            "ref": ref,
            "ref_bf16": ref_bf16,
            "masters": masters(),
            "num_updates": ema.num_updates,
            "sharded": ema.sharded,
            "local_numel": sum(t.numel() for t in ema.shadow),
            "full_numel": sum(p.numel() for _, p in named),
            "param_dtype": str(named[0][1].dtype),
            "optimizer": type(engine.optimizer).__name__,
            "accum_dtype": str(
                getattr(
                    engine.optimizer, "gradient_accumulation_dtype", getattr(engine.optimizer, "grad_acc_dtype", None)
                )
            ),
        }
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")
    else:
        masters()  # the same collectives as rank 0
    dist.shutdown()


if __name__ == "__main__":
    main()
