"""Native weight kernels (kernels/qweights.c) against their references, and the GGUF loader's
decode formats against the dense path they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvoffload.kernels import qweights as qw
from kvoffload.model import quant
from kvoffload.model.quant import Int4Linear, Int8Linear, Q5Linear, int8_rows

NATIVE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
pytestmark = pytest.mark.skipif(not qw.native_gguf(2), reason="native kernels unavailable")


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in a type's block layout, with finite fp16 scales."""
    kind = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(qtype, (0, 2) if qtype in ("Q4_1", "Q5_1") else (0,))
    for at in halves:          # fp16 in [-2, 2]
        raw[..., at:at + 2] = rng.uniform(-2, 2, (rows, cols // block)).astype(np.float16).view(np.uint8).reshape(
            rows, cols // block, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", NATIVE)
def test_gguf_dequant_is_bit_identical_to_gguf_quants(qtype):
    kind = GGMLQuantizationType[qtype].value
    raw = random_blocks(qtype, 37, 512)
    got, ref = qw.gguf_dequant(raw, kind, 512), qw.gguf_reference(raw, kind, 512)
    diff = np.abs(got - ref)
    print(f"{qtype}: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert np.array_equal(got, ref)
    idx = np.array([5, 0, 36, 5])
    assert np.array_equal(qw.gguf_gather(raw, kind, 512, idx), ref[idx])


@pytest.mark.parametrize("qtype", NATIVE)
def test_gguf_to_int8_matches_int8_rows(qtype):
    kind = GGMLQuantizationType[qtype].value
    raw = random_blocks(qtype, 70, 256, seed=1)
    q, scale = torch.empty(70, 256, dtype=torch.int8), torch.empty(70)
    order = np.arange(70)[::-1].copy()                       # rows in any order
    assert qw.gguf_to_int8(kind, raw.ctypes.data + raw.strides[0] * order, q, scale)
    rq, rs = int8_rows(torch.from_numpy(qw.gguf_reference(raw, kind, 256))[order.tolist()])
    assert torch.equal(q, rq) and torch.equal(scale, rs)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_pack_keeps_the_codes(qtype):
    kind = GGMLQuantizationType[qtype].value
    raw = random_blocks(qtype, 128, 96, seed=2)
    packed, sz = qw.q4_pack(kind, raw.ctypes.data + raw.strides[0] * np.arange(128), 96)
    ql = Int4Linear(packed, sz, None, torch.float32, 8)
    ref = torch.from_numpy(qw.gguf_reference(raw, kind, 96))
    diff = (ql.dequantized() - ref).abs()
    print(f"{qtype} -> int4 (fp32 scales): max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4pack_dequant_matches_the_packed_kernel(dtype):
    torch.manual_seed(0)
    ql = Int4Linear.from_linear(torch.nn.Linear(96, 192), dtype, 8)
    ref = ql.reference_rows(0, 192).float()
    for n0, n1 in [(0, 192), (64, 128), (128, 192)]:
        out = torch.empty(96, n1 - n0, dtype=dtype)                           # W[n0:n1].T
        assert qw.int4pack_dequant_t(ql.packed, ql.scale_zero, quant.INT4_GROUP, n0, n1, out)
        diff = (out.T.float() - ref[n0:n1]).abs()
        print(f"{dtype} rows {n0}:{n1}: max {diff.max():.2e} mean {diff.mean():.2e}")
        # the packed kernel fuses multiply-add (1 ulp in fp32); bf16 rounds both the same
        assert diff.max() <= (0 if dtype == torch.bfloat16 else 1e-6 * ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequant_matches_torch(dtype):
    torch.manual_seed(0)
    ql = Int8Linear.from_linear(torch.nn.Linear(96, 130), dtype, 8)
    for n0, n1 in [(0, 130), (7, 64), (129, 130), (5, 5)]:
        ref = ql.reference_rows(n0, n1)
        out = torch.full((n1 - n0, 96), float("nan"), dtype=dtype)
        assert qw.int8_dequant(ql.q, ql.scale, n0, n1, out)
        diff = (out.float() - ref.float()).abs()
        print(f"int8 {dtype} rows {n0}:{n1}: max {diff.max() if diff.numel() else 0:.2e}")
        assert torch.equal(out, ref)                                   # one rounding, as torch.mul
    assert not qw.int8_dequant(ql.q, ql.scale, 0, 131, torch.empty(131, 96, dtype=dtype))   # out of range


def test_q5_pack_keeps_the_files_codes_and_scales():
    """Q5_0 blocks -> q5 natively: the dequantised weight is gguf.quants' bit for bit (d·(q - 16)
    is exact in fp32), and the PyTorch packing of the same codes gives the same bytes."""
    kind = GGMLQuantizationType["Q5_0"].value
    raw = random_blocks("Q5_0", 96, 128, seed=4)
    order = np.arange(96)[::-1].copy()                       # rows in any order
    got = qw.q5_pack(raw.ctypes.data + raw.strides[0] * order, 128)
    ql = Q5Linear(*got, None, torch.float32, 8)
    ref = torch.from_numpy(qw.gguf_reference(raw, kind, 128))[order.tolist()]
    assert torch.equal(ql.dequantized(), ref)
    again = Q5Linear.from_codes(ql.codes_of(), ql.scale.T.float(), None, torch.float32, 8)
    assert torch.equal(again.codes, ql.codes) and torch.equal(again.hbits, ql.hbits) and torch.equal(again.scale, ql.scale)
    assert qw.q5_pack(raw.ctypes.data + raw.strides[0] * np.arange(80), 128) is None        # 80 rows: not whole blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q5_dequant_matches_the_reference(dtype):
    torch.manual_seed(0)
    ql = Q5Linear.from_linear(torch.nn.Linear(96, 160), dtype, 8)
    ref = ql.reference_rows(0, 160)
    for n0, n1 in [(0, 160), (32, 64), (128, 160), (64, 64)]:
        out = torch.full((96, n1 - n0), float("nan"), dtype=dtype)           # W[n0:n1].T
        assert qw.q5_dequant_t(ql.codes, ql.hbits, ql.scale, n0, n1, out)
        assert torch.equal(out.T, ref[n0:n1])                              # one rounding, as the reference
    assert not qw.q5_dequant_t(ql.codes, ql.hbits, ql.scale, 16, 48, torch.empty(96, 32, dtype=dtype))   # not a block


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear, Q5Linear])
def test_prefill_path_is_a_dense_gemm_on_the_dequantised_weight(cls, monkeypatch):
    torch.manual_seed(0)
    ql = cls.from_linear(torch.nn.Linear(64, 320, bias=True), torch.float32, max_rows=4)
    x = torch.randn(2, 5, 64)                                  # 10 rows > 4: dense path
    ref = x @ ql.dequantized().T + ql.bias                     # the GEMM on W.T as the scratch holds it
    assert torch.equal(ql(x), ref)
    monkeypatch.setattr(quant, "SCRATCH_ELEMS", 64 * 64 * 2)  # slices of 128 output channels
    assert torch.equal(ql(x), ref)
    small = ql(x[:1, :2])                                      # 2 rows: the packed kernel
    diff = (small - ref[:1, :2]).abs()
    print(f"{cls.__name__} packed vs dequantised GEMM: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < 1e-4


def test_q4k_codes_are_the_files():
    """Q4_K -> Int4Linear's codes, scales and zeros: the file's values (fp32 scales)."""
    from kvoffload.model.loader.gguf_loader import _q4k_codes

    raw = random_blocks("Q4_K", 64, 512, seed=3)
    ref = torch.from_numpy(qw.gguf_reference(raw, GGMLQuantizationType["Q4_K"].value, 512))
    q, scale, zero = _q4k_codes(raw)
    assert q.shape == (64, 512) and int(q.min()) >= 0 and int(q.max()) <= 15
    own = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    ql = Int4Linear.from_codes(q, scale, zero, None, torch.float32, 8)
    for name, got in (("codes", own), ("Int4Linear", ql.dequantized())):
        diff = (got - ref).abs()
        print(f"Q4_K -> {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() <= 1e-6 * ref.abs().max()


def test_int8_keeps_a_four_bit_layer_as_its_own_int4_codes(tiny_hf, write_gguf, tmp_path):
    """A mixed file (Q8_0, ffn_down in Q4_0): under int8 the 4-bit layer loads as int4 with the
    file's codes, the others as int8."""
    from kvoffload.model.loader.gguf_loader import load_gguf
    from kvoffload.model.loading import build_model

    hf, _ = tiny_hf("qwen2")
    path = str(tmp_path / "mixed.gguf")
    write_gguf(hf, path, "qwen2", "Q8_0", tensor_types={"ffn_down": "Q4_0"})
    dense = build_model(load_gguf(path, torch.float32), torch.device("cpu"))
    fast = build_model(load_gguf(path, torch.float32, "int8", max_rows=8), torch.device("cpu"))
    for i in range(len(fast.layers)):
        down, w = fast.layers[i].mlp.down_proj, dense.layers[i].mlp.down_proj.weight
        assert isinstance(down, Int4Linear)
        assert (down.dequantized() - w).abs().max() <= 1e-6 * w.abs().max()
        assert isinstance(fast.layers[i].mlp.gate_up_proj, Int8Linear)
        assert isinstance(fast.layers[i].attn.qkv_proj, Int8Linear)


def test_int8_keeps_a_q5_0_layer_as_its_own_codes(tiny_hf, write_gguf, tmp_path):
    """With ``q5`` (the native decode kernel runs), a Q5_0 layer loads as q5, the file's weights
    exactly; one with a Q8_0 part (qkv with v in Q8_0, as in Qwen2.5-Coder's GGUF) stays int8;
    without ``q5`` every layer is int8."""
    from kvoffload.model.loader.gguf_loader import load_gguf
    from kvoffload.model.loading import build_model
    from kvoffload.model.quant import weight_formats

    hf, _ = tiny_hf("qwen2")
    path = str(tmp_path / "q5.gguf")
    write_gguf(hf, path, "qwen2", "Q5_0", tensor_types={"attn_v": "Q8_0"})
    dense = build_model(load_gguf(path, torch.float32), torch.device("cpu"))
    fast = build_model(load_gguf(path, torch.float32, "int8", max_rows=8, q5=True), torch.device("cpu"))
    for i in range(len(fast.layers)):
        for name in ("attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            mod, w = fast.layers[i].get_submodule(name), dense.layers[i].get_submodule(name).weight
            assert isinstance(mod, Q5Linear), name
            assert torch.equal(mod.dequantized(), w), name
        assert isinstance(fast.layers[i].attn.qkv_proj, Int8Linear)
    n = len(fast.layers)
    assert weight_formats(fast) == f"int8 {n + 1}, q5 {3 * n}"
    plain = build_model(load_gguf(path, torch.float32, "int8", max_rows=8), torch.device("cpu"))
    assert weight_formats(plain) == f"int8 {4 * n + 1}"


@pytest.mark.parametrize("qtype,method", [("Q4_1", "int4"), ("Q4_0", "int4"), ("Q5_0", "int8"), ("Q8_0", "int8"),
                                          ("Q5_1", "int8")])
@pytest.mark.parametrize("arch", ["llama-linear-rope", "qwen2"])   # tied + permuted q/k; untied + biases
def test_gguf_loads_straight_into_the_decode_format(tiny_hf, write_gguf, tmp_path, qtype, method, arch):
    """The loader's modules equal what quantising the dense checkpoint gives (int8: bit for bit;
    int4 from Q4_x: the file's own codes, within the compute dtype's rounding of the scales), and
    the embedding reads the file's rows."""
    from kvoffload.model.loader.gguf_loader import load_gguf
    from kvoffload.model.loading import build_model

    hf, _ = tiny_hf(arch)
    path = str(tmp_path / f"{qtype}.gguf")
    write_gguf(hf, path, arch, qtype)
    dense = build_model(load_gguf(path, torch.float32), torch.device("cpu"))
    ckpt = load_gguf(path, torch.float32, method, max_rows=8)
    fast = build_model(ckpt, torch.device("cpu"))
    names = ["layers.1.attn.qkv_proj", "layers.0.attn.o_proj", "layers.2.mlp.gate_up_proj", "layers.0.mlp.down_proj",
             "lm_head"]
    for name in names:
        mod, w = fast.get_submodule(name), dense.get_submodule(name).weight
        if isinstance(mod, Int8Linear):
            ref = Int8Linear.from_linear(dense.get_submodule(name), torch.float32, 8)
            assert torch.equal(mod.q, ref.q) and torch.equal(mod.scale, ref.scale), name
        else:
            diff = (mod.dequantized() - w).abs()
            assert diff.max() <= 1e-6 * w.abs().max(), (name, diff.max())
    assert isinstance(fast.lm_head, Int8Linear)
    tokens = torch.tensor([[1, 7, 299, 42]])
    emb = fast.embed(tokens)
    if arch != "qwen2":                                        # tied: the embedding reads the int8 head
        assert torch.equal(emb, fast.lm_head.dequantized()[tokens])
    else:                                                      # the file's own blocks
        assert torch.equal(emb, dense.embed(tokens))
    dense_bytes = sum(t.nbytes for t in dense.state_dict().values())
    held = sum(t.nbytes for t in {t.data_ptr(): t for t in fast.state_dict().values()}.values())
    assert held < dense_bytes / 3                             # fp32 dense vs 0.5-1 byte per weight
