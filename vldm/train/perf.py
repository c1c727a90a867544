"""Throughput, FLOPs and memory: what perf/* in the logs means.

- FLOPs per micro-batch are counted once, at start, from ONE forward of the loss with gradients enabled
  (not backpropagated) under `TrainFlopCounter`, a dispatch mode that sees every matmul / conv /
  attention op as it really runs, with the shapes of the real clip:
  * forward: every op, as torch's flop counter counts it;
  * backward: per op, one forward's worth for each operand that needs a gradient: the input gradient only
    when the op's input needs one (nothing for conv_in, the time embedding or the frozen layers before the
    first temporal layer; nothing for the k/v projections of the text context), the weight gradient only
    for trainable weights (frozen spatial weights need none); attention backward as torch counts it (2.5x);
  * recompute: activation checkpointing runs the forward of checkpointed regions again in backward; every
    op that ran inside a checkpointed region and has a backward is counted once more (torch stops the
    recomputation early once the saved tensors are back, so this over-counts by ~1% at level `block`).
  Ops run under no_grad (VAE encoder, text encoder) are reported apart (`encoders`) and not in MFU: MFU
  counts only the trained computation on latents. tests/test_train_units.py checks the count against
  torch's FlopCounterMode measuring a real forward + backward at each checkpointing level.
- MFU = trained FLOPs per step per device / (step time x peak FLOP/s of the device).
- tokens = latent positions per clip (frames x h x w).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

# dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """Peak TFLOP/s of one device: the configured value, else the table above; 0 when unknown (CPU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return 0.0


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of whatever `fn` runs (forward and backward), counted by torch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


_aten = torch.ops.aten
# matmul-like ops: (position of the left operand, position of the right operand) in their arguments
_MATMUL = {_aten.mm: (0, 1), _aten.addmm: (1, 2), _aten.bmm: (0, 1), _aten.baddbmm: (1, 2)}
_CONV = {_aten.convolution, _aten._convolution, _aten.convolution_overrideable, _aten.cudnn_convolution}
# torch's fused attention forwards: query, key, value are the first three arguments, (b, h, s, d)
_SDPA = {
    getattr(_aten, n)
    for n in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, n)
}


def _in_checkpoint() -> bool:
    """True inside a region under torch.utils.checkpoint (non-reentrant): its pack hook is on top."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    if not hooks:
        return False
    pack = hooks[0]
    return "checkpoint" in f"{getattr(pack, '__module__', '')}.{getattr(pack, '__qualname__', '')}"


def _needs_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


@dataclasses.dataclass
class TrainFlops:
    """FLOPs of one micro-batch of training, by part (see the module docstring)."""

    forward: int = 0  # UNet forward (ops run with gradients enabled)
    backward: int = 0  # input + weight gradients where needed
    recompute: int = 0  # forward of checkpointed regions again in backward
    encoders: int = 0  # VAE / text encoder (no_grad): not trained, not in MFU

    @property
    def trained(self) -> int:
        return self.forward + self.backward + self.recompute


class TrainFlopCounter(TorchDispatchMode):
    """Counts `TrainFlops` from a forward run with gradients enabled (the backward is never run)."""

    def __init__(self):
        super().__init__()
        self.flops = TrainFlops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        f = 0
        if packet in flop_registry:
            f = int(flop_registry[packet](*args, **kwargs, out_val=out))
        elif "flash_attn" in str(packet) and "forward" in str(packet) and "backward" not in str(packet):
            # flash-attn 2's custom op (b, s, h, d): torch's counter does not know it; same count as SDPA
            q, k, v = (a.transpose(1, 2).shape for a in args[:3])
            f, packet = int(sdpa_flop_count(q, k, v)), "flash_attn"
        if not f:
            return out
        if not torch.is_grad_enabled():
            self.flops.encoders += f
            return out
        self.flops.forward += f
        if packet in _MATMUL:
            i, j = _MATMUL[packet]
            back = f * (_needs_grad(args[i]) + _needs_grad(args[j]))
        elif packet in _CONV:
            back = f * (_needs_grad(args[0]) + _needs_grad(args[1]))
        elif packet in _SDPA or packet == "flash_attn":
            q, k, v = args[:3]
            if packet == "flash_attn":
                q, k, v = (a.transpose(1, 2) for a in (q, k, v))
            needs = any(_needs_grad(a) for a in (q, k, v))
            back = int(sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)) if needs else 0
        else:
            back = 0
        self.flops.backward += back
        if back and _in_checkpoint():
            self.flops.recompute += f
        return out


def train_flops(forward: Callable[[], object]) -> TrainFlops:
    """Training FLOPs of one micro-batch from one grad-enabled run of `forward` (the loss; not backpropagated)."""
    counter = TrainFlopCounter()
    with torch.enable_grad(), counter:
        out = forward()
    del out  # frees the graph: nothing is backpropagated
    return counter.flops


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or peak resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
