"""The one place that picks the attention kernel.

`attention(q, k, v)` takes (batch, heads, seq, dim) tensors. Backends:
- "flash": flash-attn 2 (`pip install .[gpu]`), CUDA and fp16/bf16 only;
- "sdpa": torch.nn.functional.scaled_dot_product_attention (on a GPU it dispatches to its own flash or
  memory-efficient kernel);
- "math": an explicit softmax(QK^T/sqrt(d))V, the reference the others are tested against;
- "auto": flash when this call suits it (CUDA, fp16/bf16, head dim, equal q/k batch: `flash_unsupported`),
  else sdpa.

Temporal attention runs on (batch*height*width) short sequences, so its batch is huge at high
resolution; CUDA kernels fail when batch*heads exceeds 65,535 (pytorch issue 142228). Every call is
therefore split along the batch so no kernel call sees more than `max_batch` (batch*heads) rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # optional: only on GPU machines with the `gpu` extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

BACKENDS = ("auto", "sdpa", "flash", "math")


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2 kernels exist for head dims up to 256, in multiples of 8


def flash_unsupported(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    installed: bool | None = None,
    device_type: str | None = None,
) -> str:
    """Why flash-attn cannot take this call ('' when it can). Checked per call: one model mixes spatial
    attention (head dim 40-160 in SD) and temporal attention, cross-attention has k/v of other lengths,
    and a caller may pass fp32 (CPU, the FLOP count) or a k/v batch broadcast from the query's.
    `installed` / `device_type` stand for the real ones (flash-attn importable, the tensors' device) so the
    decision itself can be tested on CPU tensors."""
    if not ((_flash_attn_func is not None) if installed is None else installed):
        return "flash-attn is not installed"
    k = q if k is None else k
    v = k if v is None else v
    if (device_type or q.device.type) != "cuda" or not (q.device == k.device == v.device):
        return "not CUDA tensors on one device"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (flash-attn takes fp16 or bf16, the same for q, k, v)"
    d = q.shape[-1]
    if d > FLASH_MAX_HEAD_DIM or d % 8 or k.shape[-1] != d:
        return f"head dim {d} (flash-attn takes multiples of 8 up to {FLASH_MAX_HEAD_DIM}, equal for q and k)"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return f"batch q {q.shape[0]} != k/v {k.shape[0]}/{v.shape[0]}"
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        return f"heads q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}"
    return ""


def flash_available(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> bool:
    return not flash_unsupported(q, k, v)


def resolve_backend(
    backend: str, q: torch.Tensor, has_mask: bool = False, k: torch.Tensor | None = None, v: torch.Tensor | None = None
) -> str:
    """The kernel for one call: `auto` takes flash-attn when this call suits it, else torch SDPA (which on a
    GPU picks its own flash, memory-efficient or cuDNN kernel)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "flash" if (not has_mask and flash_available(q, k, v)) else "sdpa"
    if backend == "flash":
        why = flash_unsupported(q, k, v)
        if why:
            raise RuntimeError(f"attention_backend='flash' cannot run this call: {why}")
        if has_mask:
            raise RuntimeError("attention_backend='flash' does not take an attention mask (banded temporal attention)")
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _one_call(q, k, v, backend: str, mask):
    if backend == "flash":
        # flash-attn wants (batch, seq, heads, dim)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        return math_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    max_batch: int = 65535,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention on (batch, heads, seq, dim); the batch is split so batch*heads <= max_batch.

    `mask` (bool, True = attend, or additive float) broadcasts over batch and heads: (q_len, k_len).
    """
    b, h = q.shape[0], q.shape[1]
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"attention: q, k, v need the same batch, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    kind = resolve_backend(backend, q, has_mask=mask is not None, k=k, v=v)
    chunk = max(1, max_batch // h)
    if b <= chunk:
        return _one_call(q, k, v, kind, mask)
    outs = [_one_call(q[s : s + chunk], k[s : s + chunk], v[s : s + chunk], kind, mask) for s in range(0, b, chunk)]
    return torch.cat(outs, 0)


class SpatialAttnProcessor:
    """diffusers attention processor routing the frozen spatial attention through `attention()`.

    Same maths as diffusers' AttnProcessor2_0 for SD's attention blocks (no norm_cross, no masks
    beyond an optional additive one), so flash-attn is used for spatial layers too when chosen.
    """

    def __init__(self, backend: str = "auto", max_batch: int = 65535):
        self.backend = backend
        self.max_batch = max_batch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bsz, ch, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(bsz, ch, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        b = q.shape[0]
        heads = attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], b).view(b, heads, -1, ctx.shape[1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = attention(q, k, v, backend=self.backend, max_batch=self.max_batch)
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(bsz, ch, hh, ww)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
