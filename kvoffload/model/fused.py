"""A decoder layer run as two native calls for a few rows (kernels/decode.c), or as one.

:func:`fuse_layers` wraps each :class:`~kvoffload.model.llama.Block` whose projections are
:class:`~kvoffload.model.quant.Int4Linear` / :class:`~kvoffload.model.quant.Int8Linear` /
:class:`~kvoffload.model.quant.Q5Linear` in a :class:`FusedBlock`: a forward of at most its
formats' :data:`FUSED_ROWS` rows runs ``kvo_attn_in`` (norm, qkv projection, bias, RoPE), the
attention backend as usual, then ``kvo_attn_out`` (o projection, residual, norm, gate/up, SiLU,
down, residual). A decode forward whose backend offers its attention as a native hook
(``native_decode``: the in-memory backend) is ONE call, ``kvo_layer_decode``, with the same
bits. Larger forwards run the block itself (the PyTorch reference, which the tests compare
with at fp32 tolerance).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kvoffload.kernels.build import load
from kvoffload.model.interface import AttentionBackend, ForwardBatch, Phase
from kvoffload.model.llama import Block, Rot
from kvoffload.model.quant import Int4Linear, Int8Linear, Q5Linear, QuantLinear

# Rows up to which a format's native GEMV beats dequantising into the scratch + the dense GEMM
# (the PyTorch path of more rows). Measured on SmolLM2's int4 / Qwen's int8 and q5 layer shapes
# (benchmarks/ab/gemv_rows.py, 2 cores; benchmarks/README.md): int4 at 16 rows 22 against 34 ms,
# at 32 46 against 42; int8 (bf16 dot products above 8 rows) at 16 rows 61 against 83, at 32 130
# against 108; q5 at 16 rows 42 against 110, at 32 83 against 147. So a short prompt's prefill
# runs natively.
FUSED_ROWS = {Int4Linear: 32, Int8Linear: 16, Q5Linear: 32}


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("scale_f32", ctypes.c_int), ("bias", ctypes.c_void_p),
                ("hbits", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int), ("H", ctypes.c_int), ("H_kv", ctypes.c_int), ("D", ctypes.c_int),
                ("ffn", ctypes.c_int), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


def _lib():
    lib = load("decode")
    if lib is not None and not getattr(lib, "_typed", False):
        P, I = ctypes.c_void_p, ctypes.c_int
        lib.kvo_decode_supported.argtypes = lib.kvo_linear_supported.argtypes = [P]
        lib.kvo_decode_max_rows.argtypes = []
        lib.kvo_attn_in.argtypes = [P, P, I, P, P, P, I, P, I]
        lib.kvo_attn_out.argtypes = [P, P, P, I, P, I, P, I]
        lib.kvo_gemv.argtypes = [P, P, I, P, I, I]
        lib.kvo_layer_decode.argtypes = [P, P, I, P, P, P, I, P, I, P]
        lib.kvo_layer_ws.argtypes = [P, I]
        lib.kvo_layer_ws.restype = ctypes.c_int64
        lib.kvo_attn_in.restype = lib.kvo_attn_out.restype = lib.kvo_gemv.restype = None
        lib._typed = True
    return lib


def _linear(m: QuantLinear) -> _Linear | None:
    bias = 0 if m.bias is None else m.bias.data_ptr()
    if type(m) is Int4Linear:
        return _Linear(0, m.out_features, m.in_features, m.packed.data_ptr(), m.scale_zero.data_ptr(),
                       int(m.scale_zero.dtype == torch.float32), bias)
    if type(m) is Int8Linear:
        return _Linear(1, m.out_features, m.in_features, m.q.data_ptr(), m.scale.data_ptr(),
                       int(m.scale.dtype == torch.float32), bias)
    if type(m) is Q5Linear:
        return _Linear(2, m.out_features, m.in_features, m.codes.data_ptr(), m.scale.data_ptr(), 0, bias,
                       m.hbits.data_ptr())
    return None


def _native(m: QuantLinear) -> bool:
    """Whether the native GEMV reads this layer (decode.c's kvo_linear_supported)."""
    desc = _linear(m)
    return desc is not None and bool(_lib().kvo_linear_supported(ctypes.byref(desc)))


def fused_available() -> bool:
    """Whether the native decode layer (kernels/decode.c) built on this machine (AVX-512F or
    AVX2 + FMA and a C compiler)."""
    return _lib() is not None


def q5_native() -> bool:
    """Whether the native GEMV reads q5 (:class:`~kvoffload.model.quant.Q5Linear`; AVX512BW, or AVX2 +
    F16C)."""
    if _lib() is None:
        return False
    one = ctypes.c_uint64(0)
    desc = _Linear(2, 32, 32, None, None, 0, None, ctypes.addressof(one))
    return bool(_lib().kvo_linear_supported(ctypes.byref(desc)))


def max_call_rows() -> int:
    """The most rows one native call takes (decode.c's MAX_CALL_ROWS)."""
    return _lib().kvo_decode_max_rows()


def fused_rows(*linears: QuantLinear) -> int:
    """Rows up to which layers in these formats run natively."""
    return min(max_call_rows(), *(FUSED_ROWS[type(m)] for m in linears))


def gemv(m: QuantLinear, x: torch.Tensor, threads: int = 1, x_bf16: bool = False) -> torch.Tensor:
    """``x`` fp32 ``[M, K]`` (M <= :func:`max_call_rows`) times a quantised weight through the native
    kernel -> fp32 ``[M, N]`` (no bias). ``x_bf16``: every x is a bf16 number (int4 and q5 then
    take bf16 dot products, int8 above 8 rows)."""
    if x.shape[0] > max_call_rows():
        raise ValueError(f"gemv: at most {max_call_rows()} rows a call, got {x.shape[0]}")
    desc, x = _linear(m), x.float().contiguous()
    y = torch.empty(x.shape[0], m.out_features)
    _lib().kvo_gemv(ctypes.byref(desc), x.data_ptr(), x.shape[0], y.data_ptr(), int(x_bf16), threads)
    return y


class FusedBlock(nn.Module):
    """A :class:`Block` whose few-row forwards run natively (its tensors are the block's own)."""

    def __init__(self, block: Block, desc: _Layer, max_rows: int, threads: int) -> None:
        super().__init__()
        self.block, self.desc, self.max_rows, self.threads = block, desc, max_rows, threads
        a = block.attn
        self.heads, self.kv_heads, self.head_dim, self.layer = a.heads, a.kv_heads, a.head_dim, a.layer
        self.dtype = block.input_norm.weight.dtype
        self.f32 = int(self.dtype == torch.float32)
        d, f = desc.d, desc.ffn
        self.qkv_cols = (a.heads + 2 * a.kv_heads) * a.head_dim
        self.ws_in = d + self.qkv_cols                                    # fp32 workspace per row
        self.ws_out = a.heads * a.head_dim + 4 * d + 3 * f
        lib = _lib()
        self._in, self._out, self._ptr = lib.kvo_attn_in, lib.kvo_attn_out, ctypes.addressof(desc)
        self._layer = lib.kvo_layer_decode
        self._layer_ws = {M: lib.kvo_layer_ws(self._ptr, M) for M in range(1, max_rows + 1)}

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rot: Rot, backend: AttentionBackend) -> torch.Tensor:
        B, L, d = x.shape
        rows = B * L
        if rows > self.max_rows or x.dtype != self.dtype:
            return self.block(x, batch, rot, backend)
        x = x.contiguous()
        cos, sin = (t.contiguous() for t in rot)                         # [B, L, 1, D]
        native = getattr(backend, "native_decode", None) if batch.phase is Phase.DECODE else None
        hook = native(self.layer, batch, self.dtype) if native is not None else None
        if hook is not None:                         # the whole layer, attention included, in one call
            out = torch.empty_like(x)
            ws = torch.empty(self._layer_ws[rows], dtype=torch.float32)
            rc = self._layer(self._ptr, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), out.data_ptr(), self.f32,
                             ws.data_ptr(), self.threads, ctypes.byref(hook))
            if rc:
                raise RuntimeError(f"native decode layer {self.layer}: attention failed (rc {rc})")
            done = getattr(backend, "native_done", None)       # the hook's second phase, if any
            if done is not None:
                done(self.layer, batch)
            return out
        ws = torch.empty(rows * max(self.ws_in, self.ws_out), dtype=torch.float32)
        qkv = torch.empty(B, L, self.qkv_cols, dtype=x.dtype)
        self._in(self._ptr, x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(), qkv.data_ptr(), self.f32,
                 ws.data_ptr(), self.threads)
        qkv = qkv.view(B, L, -1, self.head_dim)                          # [B, L, H + 2*H_kv, D]
        H, Hk = self.heads, self.kv_heads
        q = qkv[:, :, :H].transpose(1, 2)                                # [B, H, L, D]
        k = qkv[:, :, H:H + Hk].transpose(1, 2)                          # [B, H_kv, L, D]
        v = qkv[:, :, H + Hk:].transpose(1, 2)                           # [B, H_kv, L, D]
        o = getattr(backend, batch.phase.value)(self.layer, q, k, v, batch).contiguous()   # [B, L, H, D]
        if o.dtype != x.dtype:
            o = o.to(x.dtype)
        out = torch.empty_like(x)
        self._out(self._ptr, o.data_ptr(), x.data_ptr(), rows, out.data_ptr(), self.f32, ws.data_ptr(), self.threads)
        return out


class FusedLinear(nn.Module):
    """A quantised linear layer (the LM head) whose few-row forwards run the native GEMV; its
    output is rounded to the layer's dtype as the reference's is."""

    def __init__(self, linear: QuantLinear, max_rows: int, threads: int) -> None:
        super().__init__()
        self.linear, self.max_rows, self.threads = linear, max_rows, threads
        self.desc = _linear(linear)
        self._gemv, self._ptr = _lib().kvo_gemv, ctypes.addressof(self.desc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
        rows = x.numel() // m.in_features
        if rows > self.max_rows or x.dtype != m.dtype:
            return m(x)
        x2 = x.reshape(rows, m.in_features).float().contiguous()                  # [rows, K]
        y = torch.empty(rows, m.out_features)                                    # [rows, N] fp32
        self._gemv(self._ptr, x2.data_ptr(), rows, y.data_ptr(), int(m.dtype == torch.bfloat16), self.threads)
        if m.bias is not None:
            y += m.bias
        return y.to(m.dtype).view(*x.shape[:-1], m.out_features)


def layer_descriptor(block: Block) -> _Layer | None:
    """The native view of a block's tensors, or None when the kernel cannot run it."""
    a, m = block.attn, block.mlp
    lins = [_linear(x) for x in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)]
    if any(x is None for x in lins) or m.gate_up_proj.bias is not None or m.down_proj.bias is not None \
            or a.o_proj.bias is not None:
        return None
    n1, n2 = block.input_norm, block.post_attn_norm
    if not (n1.weight.dtype == n2.weight.dtype == a.qkv_proj.dtype) or n1.weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    desc = _Layer(n1.weight.numel(), a.heads, a.kv_heads, a.head_dim, m.ffn, n1.eps, n2.eps,
                  n1.weight.data_ptr(), n2.weight.data_ptr(), *lins)
    return desc if _lib().kvo_decode_supported(ctypes.byref(desc)) else None


def fuse_layers(model: nn.Module, threads: int, max_rows: int | None = None) -> int:
    """Wrap every block the native kernels can run, and the quantised LM head, each running
    natively up to its formats' :func:`fused_rows` (at most ``max_rows`` when given); returns
    how many blocks were wrapped."""
    if _lib() is None:
        return 0
    cap = max_call_rows() if max_rows is None else max_rows
    done = 0
    head = getattr(model, "lm_head", None)
    if isinstance(head, QuantLinear) and _native(head):
        model.lm_head = FusedLinear(head, min(cap, fused_rows(head)), threads)
    for i, block in enumerate(model.layers):
        desc = layer_descriptor(block)
        if desc is not None:
            a, m = block.attn, block.mlp
            rows = fused_rows(a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            model.layers[i] = FusedBlock(block, desc, min(cap, rows), threads)
            done += 1
    return done
