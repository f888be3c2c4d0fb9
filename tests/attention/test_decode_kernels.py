"""Native decode attention kernel vs the PyTorch reference (fast path vs slow path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvoffload.attention.native import NativeDecode
from kvoffload.attention.ops import decode_attention

pytestmark = pytest.mark.skipif(NativeDecode.create(torch.float32, torch.device("cpu"), 2, 2, 16) is None,
                                reason="native kernels unavailable (no C compiler?)")


def reference_lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    H, D = q.shape
    G = H // k.shape[0]
    s = torch.einsum("hgd,htd->hgt", q.double().view(k.shape[0], G, D), k.double()) / math.sqrt(D)
    return torch.logsumexp(s, -1).reshape(H)


@pytest.mark.parametrize("kv_dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 8e-3)])   # bf16: output rounding
@pytest.mark.parametrize("H_kv,G,D", [(3, 3, 64), (2, 7, 64), (1, 4, 128)])
def test_native_matches_reference(kv_dtype, tol, H_kv, G, D):
    gen = torch.Generator().manual_seed(0)
    lens = [1, 17, 256, 257, 1000]          # chunk edges of the kernel (256) on both sides
    L, layer = 2, 1
    caps = [n + 3 for n in lens]
    ks = [torch.randn(L, H_kv, c, D, generator=gen).to(kv_dtype) for c in caps]
    vs = [torch.randn(L, H_kv, c, D, generator=gen).to(kv_dtype) for c in caps]
    B, H = len(lens), H_kv * G
    q = (torch.randn(B, H, D, generator=gen) * 2).to(kv_dtype)
    k_new = torch.randn(B, H_kv, D, generator=gen).to(kv_dtype)
    v_new = torch.randn(B, H_kv, D, generator=gen).to(kv_dtype)
    ref_k = [k[layer].clone() for k in ks]
    ref_v = [v[layer].clone() for v in vs]
    kernel = NativeDecode.create(kv_dtype, torch.device("cpu"), H_kv, G, D)
    out, lse = kernel(layer, q, k_new, v_new, np.array([k.data_ptr() for k in ks]), np.array([v.data_ptr() for v in vs]),
                      np.array(caps), np.array(lens))
    worst = 0.0
    for b, n in enumerate(lens):
        ref_k[b][:, n - 1], ref_v[b][:, n - 1] = k_new[b], v_new[b]      # same rounding as the kernel's write
        assert torch.equal(ks[b][layer, :, n - 1], ref_k[b][:, n - 1]), "appended k differs"
        assert torch.equal(vs[b][layer, :, n - 1], ref_v[b][:, n - 1]), "appended v differs"
        ref = decode_attention(q[b].float(), ref_k[b][:, :n].float(), ref_v[b][:, :n].float())
        diff = (out[b].float() - ref).abs()
        worst = max(worst, diff.max().item())
        assert diff.max().item() <= tol * max(1.0, ref.abs().max().item()), (b, diff.max().item())
        assert torch.allclose(lse[b].double(), reference_lse(q[b].float(), ref_k[b][:, :n].float()), atol=1e-4)
    print(f"{kv_dtype} H_kv={H_kv} G={G} D={D}: max |native - reference| = {worst:.2e}")


def test_other_layers_untouched():
    H_kv, G, D, cap = 2, 2, 16, 8
    k = torch.zeros(3, H_kv, cap, D)
    v = torch.zeros(3, H_kv, cap, D)
    kernel = NativeDecode.create(torch.float32, torch.device("cpu"), H_kv, G, D)
    kernel(1, torch.randn(1, H_kv * G, D), torch.ones(1, H_kv, D), torch.ones(1, H_kv, D),
           np.array([k.data_ptr()]), np.array([v.data_ptr()]), np.array([cap]), np.array([5]))
    assert k[1, :, 4].eq(1).all() and k.sum() == H_kv * D and v.sum() == H_kv * D


@pytest.mark.parametrize("kv_dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_model_decode_native_equals_torch_path(tiny_hf, kv_dtype, tol):
    """Whole-model decode steps: native kernel backend vs PyTorch backend, same logits."""
    from kvoffload.attention.dense import DenseBackend
    from kvoffload.model.interface import ForwardBatch, Logits, Phase
    from kvoffload.model.loading import build_model, read_checkpoint

    _, path = tiny_hf("qwen2")
    model = build_model(read_checkpoint(path, kv_dtype), torch.device("cpu"))     # activations = KV dtype
    lens = [5, 40, 300]
    logits = {}
    for native in (True, False):
        be = DenseBackend(model.cfg, torch.device("cpu"), kv_dtype, native=native)
        assert (be.native is not None) == native
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for i, n in enumerate(lens):
                be.allocate(i, n + 4)
                model(torch.randint(0, 256, (1, n), generator=gen),
                      ForwardBatch(Phase.PREFILL, (i,), torch.arange(n)[None], (0,), Logits.NONE), be)
            outs = []
            for step in range(4):
                starts = tuple(n + step for n in lens)
                batch = ForwardBatch(Phase.DECODE, (0, 1, 2), torch.tensor(starts)[:, None], starts)
                outs.append(model(torch.randint(0, 256, (3, 1), generator=gen), batch, be))
        logits[native] = torch.stack(outs)
    diff = (logits[True] - logits[False]).abs()
    print(f"{kv_dtype}: native vs torch decode logits max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < tol    # bf16: the PyTorch path does its matmuls in bf16, the kernel in fp32
