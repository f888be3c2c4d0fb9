"""Weight-only quantised linear layers: the decode format is the only copy of the weights.

* ``int8``: symmetric per-output-channel int8 (scale = max|w| / 127),
  ``torch._weight_int8pack_mm``; 1 byte per weight.
* ``int4``: asymmetric groups of 32 along the input dimension (w = (q - 8)·scale + zero,
  q in 0..15), ``torch._weight_int4pack_mm_for_cpu``; ~0.6 byte per weight. GGUF Q4_0
  (w = d·(q - 8)) and Q4_1 (w = d·q + m) blocks map onto it without loss of the codes
  (:meth:`Int4Linear.from_codes`: scale = d, zero = m + 8d; the scales round to the compute
  dtype).

The packed kernels win only for a few rows (decode at small batch): on this CPU int4 at
M=1 reads the SmolLM2 weights in ~6 ms vs ~17–20 ms for bf16/fp32, while at M=512 it is ~7x
slower than a bf16 GEMM. So a call of more than ``max_rows`` rows (prefill) dequantises the
weight, a slice of output channels at a time, into one scratch buffer shared by every layer
(:func:`scratch`; at most :data:`SCRATCH_ELEMS` elements) and runs the dense GEMM on it; no
dense copy is kept. The native dequantisation (kernels/qweights.c) runs at memory speed
(SmolLM2's 120 layer weights: 18 ms a forward; the first, strided version took 150 ms, most of
the prefill slowdown #15 measured). (The model code is unchanged: modules are swapped after
loading.)
"""

from __future__ import annotations

import torch
from torch import nn

from kvoffload.errors import ConfigError
from kvoffload.kernels.qweights import int4pack_dequant_t, int8_dequant

INT4_GROUP = 32
SCRATCH_ELEMS = 1 << 24          # the prefill's dense scratch: 32 MiB in bf16
_scratch: dict[torch.dtype, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, reused by every call (one per dtype)."""
    buf = _scratch.get(dtype)
    if buf is None or buf.numel() < numel:
        _scratch.pop(dtype, None)
        buf = _scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class QuantLinear(nn.Module):
    """Packed weight ``[N, K]``: the packed kernel for few rows, dequantised slices for many."""

    slice_align = 1              # output channels a dequantised slice starts at a multiple of

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 max_rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.dtype, self.max_rows = out_features, in_features, dtype, max_rows
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        y = self.packed_mm(x2) if rows <= self.max_rows else self.dense_mm(x2)     # [rows, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dense_mm(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` with ``W.T`` dequantised slice by slice into the shared scratch."""
        N, K = self.out_features, self.in_features
        step = max(self.slice_align, SCRATCH_ELEMS // K // self.slice_align * self.slice_align)
        if N <= step:
            return torch.mm(x, self.dequantize_t(0, N, scratch(N * K, self.dtype)))           # [rows, N]
        out = torch.empty(x.shape[0], N, dtype=x.dtype)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            out[:, n0:n1] = torch.mm(x, self.dequantize_t(n0, n1, scratch((n1 - n0) * K, self.dtype)))
        return out

    def dequantized(self) -> torch.Tensor:
        """The whole weight ``[N, K]`` in the compute dtype (a new tensor, transposed view; for
        tests and tools)."""
        N, K = self.out_features, self.in_features
        return self.dequantize_t(0, N, torch.empty(N * K, dtype=self.dtype)).T

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_t(self, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``n0:n1`` of the weight, transposed: ``W[n0:n1].T`` ``[K, n1-n0]`` written into the
        flat ``buf`` (``(n1-n0)*K`` elements); a view of ``buf`` (the GEMM reads either layout
        at the same speed, so each format writes the one it produces fastest)."""
        raise NotImplementedError


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[n, K]`` -> (int8 codes ``[n, K]``, fp32 scales ``[n]``), symmetric per row."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                          # [n]
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 max_rows: int) -> None:
        super().__init__(q.shape[0], q.shape[1], bias, dtype, max_rows)
        self.register_buffer("q", q)                                               # [N, K] int8
        self.register_buffer("scale", scale.to(dtype))                             # [N]

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> Int8Linear:
        q, scale = int8_rows(linear.weight.detach().float())
        return cls(q, scale, linear.bias, dtype, max_rows)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scale)

    def dequantize_t(self, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
        out = buf.view(n1 - n0, self.in_features)                                   # [n, K]
        if not int8_dequant(self.q, self.scale, n0, n1, out):
            out.copy_(self.reference_rows(n0, n1))
        return out.T

    def reference_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows ``n0:n1`` ``[n1-n0, K]`` dequantised by PyTorch: the native kernel's reference
        and fallback."""
        return self.q[n0:n1] * self.scale[n0:n1, None]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantised rows ``idx`` (any shape) -> ``[*idx.shape, K]`` (an embedding lookup)."""
        return self.q[idx] * self.scale[idx].unsqueeze(-1)


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``[N, K]`` -> (codes 0..15 ``[N, K]`` int32, scale ``[N, K/g]``, zero ``[N, K/g]``), min/max per group."""
    N, K = w.shape
    if K % INT4_GROUP:
        raise ConfigError(f"int4 needs in_features divisible by {INT4_GROUP}, got {K}")
    wg = w.view(N, K // INT4_GROUP, INT4_GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)                                              # [N, K/g]
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
    return q, scale, lo + 8 * scale


class Int4Linear(QuantLinear):
    slice_align = 64             # torch's CPU int4 pack keeps output channels in blocks of 64

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, max_rows: int) -> None:
        super().__init__(scale_zero.shape[1], scale_zero.shape[0] * INT4_GROUP, bias, dtype, max_rows)
        self.register_buffer("packed", packed)                                     # torch's CPU int4 pack
        self.register_buffer("scale_zero", scale_zero)                             # [K/g, N, 2]

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype, max_rows: int) -> Int4Linear:
        """codes 0..15 ``[N, K]``, scale and zero ``[N, K/g]``: w = (q - 8)·scale + zero."""
        if q.shape[1] % INT4_GROUP:
            raise ConfigError(f"int4 needs in_features divisible by {INT4_GROUP}, got {q.shape[1]}")
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        scale_zero = torch.stack([scale.T, zero.T], -1).to(dtype).contiguous()     # [K/g, N, 2]
        return cls(packed, scale_zero, bias, dtype, max_rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> Int4Linear:
        return cls.from_codes(*int4_codes(linear.weight.detach().float()), linear.bias, dtype, max_rows)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scale_zero)

    def dequantize_t(self, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
        out = buf.view(self.in_features, n1 - n0)                                   # [K, n]
        if not int4pack_dequant_t(self.packed, self.scale_zero, INT4_GROUP, n0, n1, out):
            out.copy_(self.reference_rows(n0, n1).T)
        return out

    def reference_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows ``n0:n1`` through the packed kernel itself (an identity matrix times W.T): the
        reference the native dequantisation is tested against, and its fallback."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP, self.scale_zero)[:, n0:n1].T


class Int8Embedding(nn.Module):
    """Token embeddings read from an int8 LM head whose weight they share (tied checkpoints)."""

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head.rows(tokens)                                              # [*tokens.shape, d]


QUANTIZERS = {"int8": Int8Linear, "int4": Int4Linear}


# The LM head (often tied to the embedding) is kept at 8 bits even under int4: checkpoints
# store it at higher precision (SmolLM2's GGUF: Q8_0), and int4 there alone cost SmolLM2
# +5.3% perplexity on pydoc text, against +0.9% with an int8 head (benchmarks/quality.md).
HEAD_METHOD = {"int8": "int8", "int4": "int8"}


def quantize(model: nn.Module, method: str, dtype: torch.dtype, device: torch.device, max_rows: int) -> None:
    """Swap every ``nn.Linear`` for its packed version (the LM head per :data:`HEAD_METHOD`); a
    tied embedding then reads the int8 head, so no dense copy of either is left."""
    if device.type != "cpu":
        raise ConfigError(f"{method} weights use a CPU kernel; on CUDA run without --quantization")
    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(model, "embed", None) is not None and head.weight is model.embed.weight
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                cls = QUANTIZERS[HEAD_METHOD[method] if child is head else method]
                setattr(module, name, cls.from_linear(child, dtype, max_rows))
    if tied:
        model.embed = Int8Embedding(model.lm_head)
