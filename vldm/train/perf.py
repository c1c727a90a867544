"""Throughput, FLOPs and memory: what perf/* in the logs means.

- FLOPs per micro-batch are counted once, at start, from one no-grad forward of the plain model (before
  DeepSpeed wraps it) under `torch.utils.flop_counter.FlopCounterMode`, with the real clip shape:
  backward costs 2x forward for layers whose weights train (input + weight gradients) and 1x for frozen
  layers the gradient passes through (input gradients only), so a step is 2 F + F_trainable (3 F when
  everything trains). Activation recomputation is not counted (MFU = model FLOPs), and the count needs
  no more memory than inference. `count_flops` counts a real forward + backward (tests compare both).
- MFU = FLOPs per step per device / (step time x peak FLOP/s of the device).
- tokens = latent positions per clip (frames x h x w).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

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


def step_flops(
    forward: Callable[[], object], model: torch.nn.Module, trainable_prefix: str, all_trainable: bool
) -> int:
    """Training FLOPs of one micro-batch from one no-grad run of `forward` (see the module docstring)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    total = int(counter.get_total_flops())
    if all_trainable:
        return 3 * total
    if trainable_prefix:
        parents = {trainable_prefix.rstrip(".")}
    else:  # the model's children that hold trainable parameters (VideoLDMUNet: temporal, conditioning)
        parents = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    roots = [type(model).__name__ + "." + r for r in parents]
    # top-level trainable modules only: a module's count already includes its children
    trainable = sum(
        sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        for root in roots
        if name.startswith(root + ".") and "." not in name[len(root) + 1 :]
    )
    return 2 * total + trainable


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or peak resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
