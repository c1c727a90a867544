"""Exponential moving average of the trainable parameters.

Kept in float32 on the parameters' device, full on every rank: after a ZeRO-2 step every rank holds
the whole updated module, so each rank updates the same EMA without communication, and rank 0 alone
writes it (temporal_ema.safetensors / unet_ema/). Frozen parameters are not tracked.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().float().clone() for p in self.params] if decay > 0 else []
        self.num_updates = 0

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, after an optimizer step that was taken."""
        if not self.enabled:
            return
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
        self.num_updates += 1

    def tensors(self, strip_prefix: str = "") -> dict[str, torch.Tensor]:
        """{name: fp32 tensor}: the EMA weights under the parameters' names (minus `strip_prefix`)."""
        src = self.shadow if self.enabled else [p.detach().float() for p in self.params]
        return {n[len(strip_prefix) :] if n.startswith(strip_prefix) else n: t for n, t in zip(self.names, src)}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], strip_prefix: str = "") -> None:
        if not self.enabled:
            return
        for i, n in enumerate(self.names):
            key = n[len(strip_prefix) :] if n.startswith(strip_prefix) else n
            if key not in tensors:
                raise KeyError(f"EMA weights have no entry for {key!r}")
            self.shadow[i].copy_(tensors[key].to(self.shadow[i].device, torch.float32))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        if self.enabled:
            self.load_tensors(state["shadow"])

    @torch.no_grad()
    def copy_to(self, module_params: list[nn.Parameter] | None = None) -> None:
        """Overwrite the live parameters with the EMA (for sampling)."""
        for p, s in zip(module_params or self.params, self.shadow):
            p.copy_(s.to(p.dtype))
