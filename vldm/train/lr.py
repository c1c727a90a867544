"""Learning rate as a pure function of the optimizer step: linear warm-up, then constant or cosine.

No scheduler object holds state: resuming at step N (at any world size) gives the LR of step N, times
the re-warm-up ramp after a resume at another world size (optim.rewarmup_steps): Adam restarts from zero
moments there, and its first updates are ~lr-sized whatever the gradient, so they are ramped in again.
"""

from __future__ import annotations

import math

from vldm.config.train import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int, rewarmup_from: int = -1) -> float:
    """LR for optimizer step `step` (0-based: the update that produces step+1); `rewarmup_from` = the
    step of a resume at another world size (-1: none)."""
    base = _schedule(step, cfg, max_steps)
    if rewarmup_from >= 0 and cfg.rewarmup_steps and step - rewarmup_from < cfg.rewarmup_steps:
        return base * (step - rewarmup_from + 1) / cfg.rewarmup_steps
    return base


def _schedule(step: int, cfg: OptimConfig, max_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
