"""Prefill attention over a prefix: the CPU split path (prefix + causal chunk, lse-merged) vs one masked SDPA call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvoffload.attention.ops import causal_mask, prefix_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("H,H_kv,start,L", [(9, 3, 100, 37), (4, 4, 1, 16), (14, 2, 513, 256)])
def test_split_prefill_equals_masked_reference(dtype, tol, H, H_kv, start, L):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(H, L, 64, generator=g).to(dtype)
    k = torch.randn(H_kv, start + L, 64, generator=g).to(dtype)
    v = torch.randn(H_kv, start + L, 64, generator=g).to(dtype)
    ref = F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(),
                                         attn_mask=causal_mask(L, start, torch.float64, q.device),
                                         enable_gqa=True)[0].transpose(0, 1)
    out = prefix_attention(q, k[:, :start], v[:, :start], k[:, start:], v[:, start:])   # CPU: the split path
    diff = (out.double() - ref).abs()
    print(f"{dtype} H={H}/{H_kv} start={start} L={L}: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert out.shape == (L, H, 64) and diff.max() < tol
