"""Exponential moving average of the trainable parameters, updated from the fp32 master weights.

Under bf16 the module's parameters are bf16 and the fp32 master copy lives in DeepSpeed's optimizer; an
EMA of the bf16 weights would lose every update below bf16's resolution (8 bits of mantissa: a step of
1e-5 on a weight of 1 is rounded away), so given the engine, the EMA reads the masters:

- ZeRO 1/2 (and the bf16 optimizer of ZeRO 1 with fp32 accumulation): each rank holds the fp32 partition
  of its flat group, linked to every parameter as `param._hp_mapping.hp_fragment` (DeepSpeed's own
  mapping, re-linked on a checkpoint load, so it is looked up at every update). Each rank keeps the EMA of
  its own fragments only: EMA memory / world size, no communication per step.
- ZeRO 0 with bf16: DeepSpeed's fp16/bf16 wrapper keeps the full fp32 masters (`fp32_groups`, or
  `fp32_groups_flat` when fused), parallel to `fp16_groups`; the EMA is full on every rank.
- fp32 parameters are their own masters: the full EMA on every rank, updated from them, as before.

`full_tensors` assembles the whole EMA (a collective where it is sharded) and only rank 0 keeps it, as for
the weights; `load_tensors` takes the whole EMA and each rank keeps its part of it, so a resume at another
world size (another partitioning) is exact. Frozen parameters are not tracked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn


@dataclass
class _Slot:
    """Where one parameter's EMA lives: the elements [start, start + numel) of the flattened parameter."""

    start: int
    numel: int
    sharded: bool  # part of a ZeRO partition: the other elements are on other ranks


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float, engine=None, warmup: bool = False):
        """`engine`: the DeepSpeed engine whose fp32 masters the EMA follows (after deepspeed.initialize,
        before any step or resume); None: the parameters themselves. The shadow starts from the masters
        (DeepSpeed makes them from the cast weights: under bf16, the bf16-rounded initial weights, which is
        what training continues from). `warmup`: see `current_decay`."""
        self.decay = decay
        self.warmup = warmup
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.slots = [_Slot(0, p.numel(), False) for p in self.params]
        self._masters: dict[int, torch.Tensor] = {}  # id(param) -> its fp32 master (ZeRO 0 bf16 wrapper)
        if engine is not None:
            self._link(engine)
        self.shadow = [t.detach().float().clone() for t in self._sources()] if decay > 0 else []
        self.num_updates = 0

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @property
    def sharded(self) -> bool:
        return any(s.sharded for s in self.slots)

    def _link(self, engine) -> None:
        opt = getattr(engine, "optimizer", None)
        # ZeRO 0 with bf16: DeepSpeed's fp16/bf16 wrapper, fused (one flat fp32 tensor per group, the
        # _flatten_dense_tensors of fp16_groups[i]: no padding) or unfused (one fp32 tensor per parameter)
        for group, flat in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups_flat", ())):
            offset = 0
            for p in group:
                self._masters[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                offset += p.numel()
        for group, fp32 in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ())):
            self._masters.update({id(p): q for p, q in zip(group, fp32)})
        for i, p in enumerate(self.params):
            if p.dtype != torch.float32 and hasattr(p, "_hp_mapping"):
                m = p._hp_mapping  # None: no element of this parameter is in this rank's partition
                self.slots[i] = (
                    _Slot(m.lp_fragment_address.start, m.lp_fragment_address.numel, True) if m else (_Slot(0, 0, True))
                )
            elif p.dtype != torch.float32 and id(p) not in self._masters:
                raise RuntimeError(f"EMA: no fp32 master weights found for {self.names[i]!r} ({p.dtype})")

    def _sources(self) -> list[torch.Tensor]:
        """The fp32 values the EMA follows, one per parameter, shaped like its shadow."""
        out = []
        for p, s in zip(self.params, self.slots):
            if s.sharded:
                m = p._hp_mapping
                out.append(m.hp_fragment if m is not None else p.new_empty(0, dtype=torch.float32))
            else:
                out.append(self._masters.get(id(p), p).detach().float())
        return out

    def current_decay(self) -> float:
        """The decay of the next update: `decay`, or with `warmup` min(decay, (1 + n) / (10 + n)) after n updates
        (diffusers' EMAModel). A from-scratch run of a few hundred steps at decay 0.99 otherwise keeps 0.99^n of
        its random initialisation in the EMA (22 % after 150 steps), and the EMA is what is sampled and exported.
        A function of num_updates alone (saved with the checkpoint): a resumed run continues the same EMA."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, after an optimizer step that was taken."""
        if not self.enabled:
            return
        torch._foreach_lerp_(self.shadow, self._sources(), 1.0 - self.current_decay())
        self.num_updates += 1

    def _key(self, name: str, strip_prefix: str) -> str:
        return name[len(strip_prefix) :] if name.startswith(strip_prefix) else name

    @torch.no_grad()
    def full_tensors(self, strip_prefix: str = "", keep: bool = True) -> dict[str, torch.Tensor]:
        """{name: fp32 host tensor} of the whole EMA (the masters themselves when EMA is off). Sharded, a
        collective (every rank calls it); only the rank with `keep` (rank 0) copies it to host memory, the
        others drop each assembled tensor at once and get {}."""
        src = self.shadow if self.enabled else self._sources()
        out = {}
        for name, p, s, t in zip(self.names, self.params, self.slots, src):
            if s.sharded:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=t.device)
                full.narrow(0, s.start, s.numel).copy_(t)
                tdist.all_reduce(full, group=getattr(p, "_dp_group", None))  # zeros elsewhere: the sum assembles
                t = full.view(p.shape)
            if keep:
                out[self._key(name, strip_prefix)] = t.detach().float().cpu().contiguous()
        return out

    def tensors(self, strip_prefix: str = "") -> dict[str, torch.Tensor]:
        """The whole EMA of an unsharded EMA (no collective); see full_tensors."""
        if self.sharded:
            raise RuntimeError("EMA.tensors: the EMA is sharded over ZeRO partitions; use full_tensors (collective)")
        return self.full_tensors(strip_prefix)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], strip_prefix: str = "") -> None:
        """Load the whole EMA (e.g. a checkpoint's temporal_ema.safetensors); each rank keeps its part."""
        if not self.enabled:
            return
        for i, n in enumerate(self.names):
            key = self._key(n, strip_prefix)
            if key not in tensors:
                raise KeyError(f"EMA weights have no entry for {key!r}")
            value = tensors[key].to(self.shadow[i].device, torch.float32)
            s = self.slots[i]
            if s.sharded:
                value = value.flatten().narrow(0, s.start, s.numel)
            self.shadow[i].copy_(value.view_as(self.shadow[i]))

    def state_dict(self) -> dict:
        """This rank's EMA (its fragments when sharded): for in-process use; checkpoints hold full_tensors."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        if self.enabled:
            for t, n in zip(self.shadow, self.names):
                t.copy_(state["shadow"][n])
