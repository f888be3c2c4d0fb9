"""Fused native decoder layers (kernels/decode.c) against the PyTorch reference path."""

from __future__ import annotations

import copy

import pytest
import torch

from kvoffload.model import fused as fused_lib
from kvoffload.model.fused import FusedBlock, FusedLinear, fuse_layers
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.model.quant import FORMATS

pytestmark = pytest.mark.skipif(fuse_layers.__module__ and __import__("kvoffload.model.fused", fromlist=["_lib"])._lib()
                                is None, reason="native kernels unavailable")

# the decode formats the native kernel runs here (q5 needs AVX512BW)
NATIVE_FORMATS = [m for m in sorted(FORMATS) if m != "q5" or fused_lib.q5_native()]


class EchoBackend:
    """Attention stand-in: o = q + the mean of v over its KV heads and positions."""

    def decode(self, layer, q, k, v, batch):
        G = q.shape[1] // k.shape[1]
        o = q + v.repeat_interleave(G, 1).mean(2, keepdim=True) + 0.1 * k.repeat_interleave(G, 1)
        return o.transpose(1, 2)                                          # [B, L, H, D]

    prefill = decode


def tiny_model(tiny_hf, arch: str, method: str, dtype: torch.dtype):
    from kvoffload.model.loading import build_model, read_checkpoint
    from kvoffload.model.quant import quantize

    _, path = tiny_hf(arch)
    model = build_model(read_checkpoint(path, dtype), torch.device("cpu"))
    quantize(model, method, dtype, torch.device("cpu"), max_rows=8)
    return model


@pytest.mark.parametrize("method", NATIVE_FORMATS)
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (2, 4), (2, 8), (1, 30)])
def test_fused_layers_match_the_reference_in_fp32(tiny_hf, arch, method, rows):
    model = tiny_model(tiny_hf, arch, method, torch.float32)
    fused = copy.deepcopy(model)
    assert fuse_layers(fused, threads=2) == len(model.layers)
    assert all(isinstance(b, FusedBlock) for b in fused.layers)
    assert isinstance(fused.lm_head, FusedLinear)
    B, L = rows
    g = torch.Generator().manual_seed(B * 10 + L)
    tokens = torch.randint(0, 256, (B, L), generator=g)
    positions = torch.arange(L).expand(B, L) + torch.tensor([[5], [9], [30]])[:B]
    batch = ForwardBatch(Phase.DECODE, tuple(range(B)), positions, tuple([L] * B), Logits.ALL)
    with torch.inference_mode():
        ref, got = model(tokens, batch, EchoBackend()), fused(tokens, batch, EchoBackend())
    diff = (got - ref).abs()
    print(f"{arch} {method} {B}x{L}: max {diff.max():.2e} mean {diff.mean():.2e} (logits up to {ref.abs().max():.1f})")
    assert diff.max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("method", NATIVE_FORMATS)
@pytest.mark.parametrize("L", [1, 16])
def test_fused_layers_in_bf16_stay_close(tiny_hf, method, L):
    model = tiny_model(tiny_hf, "qwen2", method, torch.bfloat16)
    fused = copy.deepcopy(model)
    fuse_layers(fused, threads=2)
    tokens = torch.arange(17, 17 + L)[None]
    batch = ForwardBatch(Phase.DECODE if L == 1 else Phase.PREFILL, (0,), torch.arange(7, 7 + L)[None], (L,),
                         Logits.ALL)
    with torch.inference_mode():
        ref, got = model(tokens, batch, EchoBackend()), fused(tokens, batch, EchoBackend())
    diff = (got - ref).abs()
    print(f"bf16 {method} {L} rows: max {diff.max():.2e} mean {diff.mean():.2e} (logits up to {ref.abs().max():.1f})")
    assert diff.max() <= 0.05 * ref.abs().max()                  # bf16 rounding at a few points differs


def test_many_rows_run_the_reference(tiny_hf):
    model = tiny_model(tiny_hf, "qwen2", "int8", torch.float32)
    fused = copy.deepcopy(model)
    fuse_layers(fused, threads=2, max_rows=2)
    tokens = torch.tensor([[1, 2, 3]])
    batch = ForwardBatch(Phase.PREFILL, (0,), torch.arange(3)[None], (3,), Logits.ALL)
    with torch.inference_mode():
        assert torch.equal(model(tokens, batch, EchoBackend()), fused(tokens, batch, EchoBackend()))


@pytest.mark.parametrize("method", NATIVE_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_fused_head_matches_its_linear(method, rows):
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(128, 320, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(320, 128, generator=g))
        lin.bias.copy_(torch.randn(320, generator=g))
    m = FORMATS[method].from_linear(lin, torch.float32, max_rows=8)
    head = FusedLinear(m, max_rows=8, threads=2)
    x = torch.randn(rows, 1, 128, generator=g)
    ref, got = m(x), head(x)
    assert got.shape == ref.shape == (rows, 1, 320) and got.dtype == ref.dtype
    diff = (got - ref).abs()
    print(f"{method} {rows} rows: max {diff.max():.2e} mean {diff.mean():.2e}")
    if rows > 8:
        assert torch.equal(got, ref)                                  # the reference itself
    else:
        assert diff.max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("method", NATIVE_FORMATS)
def test_gemv_rows_in_passes_match_the_reference_and_single_rows(method):
    """More rows than one register pass (8) go in passes over each weight tile: each row is the
    same bits as the row alone, and all are close to the PyTorch reference."""
    from kvoffload.model.fused import gemv, max_call_rows
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(192, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 192, generator=g))
    m = FORMATS[method].from_linear(lin, torch.float32, max_rows=64)
    M = max_call_rows()
    x = torch.randn(M, 192, generator=g)
    got = gemv(m, x, threads=2)                                           # [M, 256]
    alone = torch.cat([gemv(m, x[i:i + 1], threads=2) for i in range(M)])
    assert torch.equal(got, alone)
    ref = x @ m.dequantized().T
    diff = (got - ref).abs()
    print(f"{method} {M} rows: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("rows", [9, 16, 32])
def test_int8_bf16_dot_products_match_fp32(rows):
    """Above 8 rows of bf16 activations, int8 takes bf16 dot products (exact products, sums in
    another order): close to the fp32 kernel and to x @ W^T."""
    from kvoffload.model.fused import gemv
    from kvoffload.model.quant import Int8Linear

    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(4864 // 8, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 608, generator=g))
    m = Int8Linear.from_linear(lin, torch.bfloat16, max_rows=64)
    x = torch.randn(rows, 608, generator=g).bfloat16().float()           # bf16 numbers
    got, f32 = gemv(m, x, threads=2, x_bf16=True), gemv(m, x, threads=2)
    ref = x.double() @ (m.q.double() * m.scale.double()[:, None]).T
    for name, y in (("bf16 dot", got), ("fp32", f32)):
        diff = (y.double() - ref).abs()
        print(f"{rows} rows, {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() <= 1e-5 * ref.abs().max()


def ragged_decode(model, be, prompts: list[torch.Tensor], steps: int, spy) -> torch.Tensor:
    """Prefill prompt i into ``be`` as sequence i, then ``steps`` decode steps of the ragged
    batch of 3 with the fused layers' forward replaced by ``spy``: the logits ``[steps, 3, 1, V]``."""
    for i, p in enumerate(prompts):
        be.allocate(i, 64)
        with torch.inference_mode():
            model(p, ForwardBatch(Phase.PREFILL, (i,), torch.arange(p.shape[1])[None], (0,), Logits.LAST), be)
    starts, logits = [p.shape[1] for p in prompts], []
    real = fused_lib.FusedBlock.forward
    fused_lib.FusedBlock.forward = spy
    try:
        for step in range(steps):
            tok = torch.tensor([[7 + step], [100 + step], [200 - step]])
            batch = ForwardBatch(Phase.DECODE, (0, 1, 2), torch.tensor(starts)[:, None], tuple(starts), Logits.ALL)
            with torch.inference_mode():
                logits.append(model(tok, batch, be))
            starts = [s + 1 for s in starts]
    finally:
        fused_lib.FusedBlock.forward = real
    return torch.stack(logits)


# (activation dtype, KV dtype): the same, and the KV in another dtype (the hook rounds k/v to it)
HOOK_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
               (torch.float32, torch.float16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("method", NATIVE_FORMATS)
@pytest.mark.parametrize("dtype,kv_dtype", HOOK_DTYPES)
def test_layer_in_one_call_with_the_backends_hook_equals_the_three_steps(tiny_hf, method, dtype, kv_dtype):
    """With the in-memory backend's native hook a fused decode layer is one native call (its
    attention inside); a ragged batch of 3 decoding across a block boundary gives the same
    logits, bit for bit, as the fused layer's two calls around ``backend.decode``, and the same
    KV -- also where the KV's dtype is not the activations' (k/v rounded in the hook)."""
    from kvoffload.attention.dense import DenseBackend
    from kvoffload.model import fused

    model = tiny_model(tiny_hf, "qwen2", method, dtype)
    fuse_layers(model, threads=2)
    calls = []
    real = fused.FusedBlock.forward

    def spy(self, x, batch, rot, backend):
        calls.append(backend.native_decode(self.layer, batch, self.dtype) if batch.phase is Phase.DECODE else None)
        if calls[-1] is not None and self.layer == len(model.layers) - 1:
            backend.decode_tokens -= len(batch.seq_ids)          # (the spy's own call counted them)
        return real(self, x, batch, rot, backend)

    lens = (13, 16, 30)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in lens]
    outs, kvs = [], []
    for hook in (True, False):
        be = DenseBackend(model.cfg, torch.device("cpu"), kv_dtype, dtype, block_size=16)
        be.native_hook = hook
        outs.append(ragged_decode(model, be, prompts, 5, spy))
        assert (calls[-1] is not None) == hook and be.decode_tokens == 15
        calls.clear()
        kvs.append([be.seqs[i].clone() for i in range(3)])
    diff = (outs[0].float() - outs[1].float()).abs()
    print(f"{method} {dtype} (KV {kv_dtype}): hook vs decode(): max {diff.max():.2e}")
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*kvs))


@pytest.mark.parametrize("stored", [None, "int8", "int4"])
@pytest.mark.parametrize("tiers", ["host:none", "host:none,disk:none", "host:1KiB,disk:none"])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_tiered_layer_in_one_call_equals_the_steps_through_python(tiny_hf, stored, tiers, dtype, kv_dtype):
    """The tiered backend's hook (a dense layer whose chunks are all in RAM: the tails' call, the
    blocks' call by address, the merge, inside the fused layer's native call) gives the same
    logits, bit for bit, as its layer through Python (``decode``), and the same stored KV and
    counters; full-precision and compressed blocks, a disk tier present but unused, and chunks
    on disk (no hook for those layers). A ragged batch of 3 decoding across block boundaries:
    a tail that fills becomes a block after the hooked call (``native_done``)."""
    from kvoffload.attention.tiered import TieredBackend
    from kvoffload.config import KVConfig
    from kvoffload.model import fused

    model = tiny_model(tiny_hf, "qwen2", "int8", dtype)
    fuse_layers(model, threads=2)
    calls = []
    real = fused.FusedBlock.forward

    def spy(self, x, batch, rot, backend):
        if batch.phase is Phase.DECODE:
            calls.append(backend.native_decode(self.layer, batch, self.dtype))
            if calls[-1] is not None:        # (undo what the spy's own call counted)
                for t, read, n in backend._plans[self.layer].reads:
                    backend.tiers[t].counters.read -= read
                    backend.tiers[t].counters.blocks -= n
                backend.tail_counters.read -= int(backend._step_state.last.sum()) * backend.tail_layout.token_bytes(1)
                if self.layer == len(model.layers) - 1:
                    backend.decode_tokens -= len(batch.seq_ids)
        return real(self, x, batch, rot, backend)

    lens = (13, 16, 47)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, n), generator=g) for n in lens]
    kvcfg = KVConfig(block_size=4, chunk_blocks=2, kv_tiers=tiers, disk_workers=0, kv_sink_tokens=0, kv_recent_tokens=0)
    outs, kvs, counters, hooked = [], [], [], []
    for hook in (True, False):
        be = TieredBackend(model.cfg, kvcfg, torch.device("cpu"), kv_dtype, dtype, 2, stored=stored)
        be.native_hook = hook
        try:
            outs.append(ragged_decode(model, be, prompts, 6, spy))
            hooked.append(sum(c is not None for c in calls))
            calls.clear()
            assert be.decode_tokens == 18
            L = len(model.layers)
            kvs.append([torch.cat(be.store.read_kv(i, layer, torch.arange(-(-(lens[i] + 6) // 4)).numpy()))
                        for i in range(3) for layer in (0, L - 1)])
            counters.append([(t.counters.read, t.counters.blocks) for t in be.tiers] + [be.tail_counters.read])
        finally:
            be.close()
    print(f"{stored} {tiers}: {hooked[0]} of {6 * len(model.layers)} layers hooked; counters {counters[0]}")
    # every layer of every step (4 of the 6 fill a tail), unless chunks are on disk
    assert hooked[1] == 0 and hooked[0] == (0 if "1KiB" in tiers else 6 * len(model.layers))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*kvs))
    assert counters[0] == counters[1]


@pytest.mark.parametrize("method", ["int4", "q5"])
@pytest.mark.parametrize("rows", [1, 8, 9, 32])
def test_pair_dot_products_match_the_exact_weights(method, rows):
    """int4 and q5 with bf16 activations take bf16 dot products over pairs of inputs (codes looked
    up as exact bf16; int4's interleaved from its packed layout, q5's packed so), fp32 activations
    FMAs. Both within fp32 rounding of x @ W^T in fp64 with the format's own weights (q5: d·(q -
    16) exactly, not the bf16-rounded weight its dense path uses; int4: fp32 scales and zeros),
    and every row the same bits as the row alone. Without AVX512BF16 (and BW) int4's bf16 calls
    take the FMAs too; q5 needs AVX512BW."""
    from kvoffload.model.fused import gemv, q5_native

    if method == "q5" and not q5_native():
        pytest.skip("q5 needs AVX512BW")
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(896, 192, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 896, generator=g))
    if method == "q5":
        m = FORMATS[method].from_linear(lin, torch.bfloat16, max_rows=8)
        exact = (m.codes_of().double() - 16) * m.scale.T.double().repeat_interleave(32, 1)   # [N, K]
    else:
        m = FORMATS[method].from_linear(lin, torch.float32, max_rows=8)       # fp32 scales and zeros
        exact = m.dequantized().double()
    x = torch.randn(rows, 896, generator=g).bfloat16().float()               # bf16 numbers
    ref = x.double() @ exact.T
    for name, bf in (("bf16 pairs", True), ("fp32", False)):
        y = gemv(m, x, threads=2, x_bf16=bf)
        alone = torch.cat([gemv(m, x[i:i + 1], threads=2, x_bf16=bf) for i in range(rows)])
        diff = (y.double() - ref).abs()
        print(f"{method} {rows} rows, {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() <= 1e-5 * ref.abs().max()
        assert torch.equal(y, alone)
