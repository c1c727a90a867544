"""The attention dispatcher: every backend computes the same attention; big batches are chunked."""

from __future__ import annotations

import pytest
import torch

from vldm.models import attention as A
from vldm.models.temporal import band_mask


def qkv(b=6, h=4, s=8, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(3)]


def test_sdpa_matches_plain_softmax_reference():
    q, k, v = qkv()
    ref = A.math_attention(q, k, v)
    assert torch.allclose(A.attention(q, k, v, backend="sdpa"), ref, atol=1e-5)
    assert torch.allclose(A.attention(q, k, v, backend="auto"), ref, atol=1e-5)


def test_chunked_calls_never_exceed_max_batch(monkeypatch):
    q, k, v = qkv(b=37, h=4)
    seen = []
    real = A._one_call

    def spy(q_, k_, v_, kind, mask):
        seen.append(q_.shape[0] * q_.shape[1])
        return real(q_, k_, v_, kind, mask)

    monkeypatch.setattr(A, "_one_call", spy)
    out = A.attention(q, k, v, backend="sdpa", max_batch=20)  # 20 // 4 heads = 5 sequences per call
    assert max(seen) <= 20 and len(seen) == 8
    assert torch.allclose(out, A.math_attention(q, k, v), atol=1e-5)


def test_unequal_batches_are_refused():
    q, _, _ = qkv(b=9)
    k, v = qkv(b=1, seed=3)[:2]
    with pytest.raises(ValueError, match="same batch"):
        A.attention(q, k, v, backend="sdpa", max_batch=8)


def test_band_mask_matches_reference():
    q, k, v = qkv(s=10)
    m = band_mask(10, 4, q.device)
    assert m[2, 0] and not m[3, 0] and m[0, 1] and not m[0, 2]  # 2 frames back, 1 ahead: 4 frames
    assert torch.allclose(A.attention(q, k, v, backend="sdpa", mask=m), A.math_attention(q, k, v, m), atol=1e-5)


@pytest.mark.parametrize("band", [1, 2, 3, 4, 5, 8])
def test_band_mask_covers_exactly_band_frames(band):
    m = band_mask(20, band, torch.device("cpu"))
    inner = m[band : 20 - band]  # rows whose window is not cut by the ends of the sequence
    assert inner.sum(1).tolist() == [band] * inner.shape[0]
    assert m.diagonal().all()  # a frame always sees itself
    rows = [i for i in range(20) if m[i].sum() == band]
    assert all(m[i].nonzero().flatten().diff().eq(1).all() for i in rows)  # contiguous windows


def test_flash_refuses_clearly_without_cuda():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="flash"):
        A.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="backend"):
        A.attention(q, k, v, backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_bf16_kernels_match_fp32_reference_on_gpu(backend):
    q, k, v = qkv(b=70000 // 4, h=4, s=16, d=64, dtype=torch.bfloat16, device="cuda")
    out = A.attention(q, k, v, backend=backend)  # > 65,535 batch*heads: must be chunked, not crash
    ref = A.math_attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 3e-2
