"""Weight-only quantised linears: packed kernels vs their dequantised reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvoffload.model.quant import (
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    int4_pack,
    int4_unpack,
    torch_packs_int4_alike,
)


def q4_1_like_linear(N: int = 48, K: int = 128, seed: int = 0) -> nn.Linear:
    """Weights exactly representable as GGUF Q4_1: w = d*q + m per group of 32, q spanning 0..15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K // INT4_GROUP, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(N, K // INT4_GROUP, 1, generator=g).half().float() * 0.1 + 0.01
    m = -torch.rand(N, K // INT4_GROUP, 1, generator=g).half().float()
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data = (d * q + m).view(N, K)
    return lin


@pytest.mark.parametrize("N", [64, 80, 128, 176])
def test_int4_layout_is_the_same_on_every_cpu(N):
    """The stored int4 layout is kvoffload's own (PyTorch packs by the CPU it runs on: the layouts
    differed under AVX2, and prefill on the dequantised weight read garbage): it round-trips, puts
    each code where the native kernels look, and PyTorch's packed matmul reads the same weight."""
    K = 96
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(N))
    packed = int4_pack(q)
    assert packed.shape == (N, K // 2) and torch.equal(int4_unpack(packed), q)
    flat = packed.reshape(-1)
    for n, k in [(0, 0), (5, 7), (33, 95), (63, 40)]:       # block 0: byte (0, k, n % 32), nibble n // 32
        assert (flat[k * 32 + n % 32] >> (4 * (n // 32))) & 15 == q[n, k]
    if torch_packs_int4_alike():
        assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(q, 2))
    g = K // INT4_GROUP                                     # w = (q - 8)·1 + 8 = q
    ql = Int4Linear.from_codes(q, torch.ones(N, g), torch.full((N, g), 8.0), None, torch.float32, 8)
    assert torch.equal(ql.reference_rows(0, N), q.float())                 # through PyTorch's kernel
    assert torch.equal(ql.dequantized(), q.float())                         # the native dequantisation
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ql(x), x @ q.float().T, rtol=1e-5, atol=1e-4)    # few rows: packed


def test_int4_repacks_q4_1_losslessly_in_fp32():
    lin = q4_1_like_linear()
    ql = Int4Linear.from_linear(lin, torch.float32, max_rows=8)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ lin.weight.double().T
    diff = (ql(x).double() - ref).abs()
    print(f"int4 fp32 vs Q4_1 weights: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < 1e-4


@pytest.mark.parametrize("cls,dtype,rel", [(Int8Linear, torch.float32, 1e-5), (Int8Linear, torch.bfloat16, 2e-2),
                                           (Int4Linear, torch.float32, 1e-5), (Int4Linear, torch.bfloat16, 2e-2)])
def test_packed_kernel_matches_dequantised_reference(cls, dtype, rel):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    ql = cls.from_linear(lin, dtype, max_rows=8)
    x = torch.randn(5, 128).to(dtype)
    if cls is Int8Linear:
        w = ql.q.float() * ql.scale.float()[:, None]
    else:   # dequantise from the stored scale/zero the same way the kernel does
        lo_scale, zero = ql.scale_zero[..., 0].float().T, ql.scale_zero[..., 1].float().T   # [N, K/g]
        wg = lin.weight.detach().float().view(64, -1, INT4_GROUP)
        mn = wg.amin(-1)
        s32 = ((wg.amax(-1) - mn) / 15).clamp(min=1e-12)
        q = torch.round((wg - mn[..., None]) / s32[..., None]).clamp(0, 15)
        w = ((q - 8) * lo_scale[..., None] + zero[..., None]).view(64, 128)
    ref = x.float() @ w.T + ql.bias.float()
    got = ql(x).float()
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), err


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_many_rows_use_the_dequantised_weight(cls):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    ql = cls.from_linear(lin, torch.float32, max_rows=4)
    x = torch.randn(2, 3, 64)                      # 6 rows > 4: dense GEMM on the dequantised weight
    assert torch.equal(ql(x), x @ ql.dequantized().T + ql.bias)    # same operand layout: same bits
    assert (ql(x) - lin(x)).abs().max() < 0.2      # the format's quantisation error
    small = ql(x[:1, :2])                          # 2 rows: packed kernel, close
    assert small.shape == (1, 2, 64)
    assert (small - lin(x[:1, :2])).abs().max() < 0.2
    assert not any(b.dtype.is_floating_point and b.shape == lin.weight.shape for b in ql.buffers())   # no dense copy


def test_lm_head_stays_8_bit_under_int4(tiny_hf):
    from kvoffload.model.loading import build_model, read_checkpoint
    from kvoffload.model.quant import quantize

    _, path = tiny_hf("llama-linear-rope")          # tied embeddings
    model = build_model(read_checkpoint(path, torch.bfloat16), torch.device("cpu"))
    quantize(model, "int4", torch.bfloat16, torch.device("cpu"), max_rows=8)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.layers[0].attn.qkv_proj, Int4Linear)
    assert model.embed.head is model.lm_head       # tied: the embedding reads the int8 head, no dense copy
    tokens = torch.tensor([[3, 9]])
    assert torch.equal(model.embed(tokens), model.lm_head.dequantized()[tokens])
