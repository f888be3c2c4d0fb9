"""Weight-only quantised linear layers: the decode format is the only copy of the weights.

* ``int8``: symmetric per-output-channel int8 (scale = max|w| / 127),
  ``torch._weight_int8pack_mm``; 1 byte per weight.
* ``int4``: asymmetric groups of 32 along the input dimension (w = (q - 8)·scale + zero,
  q in 0..15), ``torch._weight_int4pack_mm_for_cpu``; ~0.6 byte per weight. GGUF Q4_0
  (w = d·(q - 8)) and Q4_1 (w = d·q + m) blocks map onto it without loss of the codes
  (:meth:`Int4Linear.from_codes`: scale = d, zero = m + 8d; the scales round to the compute
  dtype).
* ``q5`` (:class:`Q5Linear`): GGUF Q5_0's own 5-bit codes and fp16 scales (w = d·(q - 16), groups
  of 32 inputs), ~0.69 byte per weight, repacked for the native kernel's bf16 dot products over
  pairs of inputs. Not a ``--quantization`` of its own: ``int8`` loads a Q5_0 layer this way (the
  file's weights exactly, in 5.5 of 8 bits; Qwen2.5-Coder-0.5B).

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

import functools

import numpy as np
import torch
from torch import nn

from kvoffload.errors import ConfigError
from kvoffload.kernels.qweights import int4pack_dequant_t, int8_dequant, q5_dequant_t

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
    format = ""                  # the format's name (load reports, the KV store's fingerprint)

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
    format = "int8"

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


INT4_BLOCK = 64                  # output channels a block of the int4 layout holds


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` -> the int4 layout ``[N, K/2]`` uint8 that the native kernels read
    (decode.c, qweights.c) and ``torch._weight_int4pack_mm_for_cpu`` reads where PyTorch runs its
    AVX-512 kernels: blocks of 64 output channels ``[N/64, K, 32]``, row ``64·nb + j`` in the low
    nibble of byte ``(nb, k, j)`` and row ``64·nb + 32 + j`` in its high nibble; a last block of
    16, 32 or 48 rows ``[K, rows/2]`` in pairs (row 2i low, 2i + 1 high). PyTorch's own packing
    (``_convert_weight_to_int4pack_for_cpu``) follows the CPU it runs on (blocks of 32 under
    AVX2, plain pairs without either), so it is not used for the stored copy."""
    N, K = q.shape
    if N % 16 or K % 2:
        raise ConfigError(f"int4 needs out_features divisible by 16 and even in_features, got {N} x {K}")
    q = q.to(torch.uint8)
    full = N // INT4_BLOCK * INT4_BLOCK
    b = q[:full].view(full // INT4_BLOCK, 2, INT4_BLOCK // 2, K)                  # [nb, nibble, j, k]
    parts = [(b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(-1)]              # [nb, K, 32]
    t = q[full:].view(-1, 2, K)                                                     # [rows/2, pair, k]
    parts.append((t[:, 0] | (t[:, 1] << 4)).T.reshape(-1))                          # [K, rows/2]
    return torch.cat(parts).view(N, K // 2)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """:func:`int4_pack`'s inverse: ``[N, K/2]`` uint8 -> codes ``[N, K]`` int32."""
    N, K = packed.shape[0], packed.shape[1] * 2
    full = N // INT4_BLOCK * INT4_BLOCK
    flat = packed.reshape(-1).to(torch.int32)
    b = flat[:full * K // 2].view(full // INT4_BLOCK, K, INT4_BLOCK // 2).transpose(1, 2)   # [nb, j, k]
    t = flat[full * K // 2:].view(K, (N - full) // 2).T                                      # [rows/2, k]
    return torch.cat([torch.stack([b & 15, b >> 4], 1).reshape(full, K),
                      torch.stack([t & 15, t >> 4], 1).reshape(N - full, K)])


@functools.cache
def torch_packs_int4_alike() -> bool:
    """Whether this PyTorch, on this CPU, packs int4 as :func:`int4_pack` does (its AVX-512
    kernels): then its packed matmul reads the stored copy directly."""
    q = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(torch._convert_weight_to_int4pack_for_cpu(q, 2), int4_pack(q))


class Int4Linear(QuantLinear):
    format = "int4"
    slice_align = INT4_BLOCK     # the layout keeps output channels in blocks of 64

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, max_rows: int) -> None:
        super().__init__(scale_zero.shape[1], scale_zero.shape[0] * INT4_GROUP, bias, dtype, max_rows)
        self.register_buffer("packed", packed)                                     # int4_pack's layout
        self.register_buffer("scale_zero", scale_zero)                             # [K/g, N, 2]
        self._torch_packed: torch.Tensor | None = None

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype, max_rows: int) -> Int4Linear:
        """codes 0..15 ``[N, K]``, scale and zero ``[N, K/g]``: w = (q - 8)·scale + zero."""
        if q.shape[1] % INT4_GROUP:
            raise ConfigError(f"int4 needs in_features divisible by {INT4_GROUP}, got {q.shape[1]}")
        packed = int4_pack(q)
        scale_zero = torch.stack([scale.T, zero.T], -1).to(dtype).contiguous()     # [K/g, N, 2]
        return cls(packed, scale_zero, bias, dtype, max_rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> Int4Linear:
        return cls.from_codes(*int4_codes(linear.weight.detach().float()), linear.bias, dtype, max_rows)

    def torch_packed(self) -> torch.Tensor:
        """The weight in the layout PyTorch's packed matmul reads on this CPU: the stored copy
        where the two agree, else a repacked copy made at first use (the PyTorch fallback and
        the reference only: the native kernels read the stored one)."""
        if torch_packs_int4_alike():
            return self.packed
        if self._torch_packed is None:
            self._torch_packed = torch._convert_weight_to_int4pack_for_cpu(int4_unpack(self.packed), 2)
        return self._torch_packed

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.torch_packed(), INT4_GROUP, self.scale_zero)

    def dequantize_t(self, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
        out = buf.view(self.in_features, n1 - n0)                                   # [K, n]
        if not int4pack_dequant_t(self.packed, self.scale_zero, INT4_GROUP, n0, n1, out):
            out.copy_(self.reference_rows(n0, n1).T)
        return out

    def reference_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows ``n0:n1`` through the packed kernel itself (an identity matrix times W.T): the
        reference the native dequantisation is tested against, and its fallback."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return torch._weight_int4pack_mm_for_cpu(eye, self.torch_packed(), INT4_GROUP, self.scale_zero)[:, n0:n1].T


Q5_GROUP = 32                    # inputs per scale (GGUF Q5_0's block)


class Q5Linear(QuantLinear):
    """GGUF Q5_0's codes q (0..31) and scales d: w = d·(q - 16). Layout (kernels/kvo_q5.h, read
    by decode.c and qweights.c): per block of 32 rows and quad of inputs 4t..4t+3, ``codes``
    ``[N/32, K/4, 64]`` uint8 and ``hbits`` ``[N/32, K/4, 2]`` (uint64 bits in int64). Byte
    i = 16·l + e holds in its low nibble the low 4 bits of the code of row 4·l + (e % 8)/2 (+16
    when e >= 8) at input 4t + e % 2, in its high nibble that at input 4t + 2 + e % 2; bit i of
    hbits' first / second word is the fifth bit of the low / high nibble's code. ``scale``
    ``[K/32, N]`` fp16. So a quad of 32 rows is 64 bytes + 16, and its 128 weights four vectors
    of 32 bf16 (128 + q) for vdpbf16ps, unpacked with no table. Few rows run natively only
    (:mod:`kvoffload.model.fused`); the PyTorch path dequantises."""

    format = "q5"
    slice_align = 32

    def __init__(self, codes: torch.Tensor, hbits: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, max_rows: int) -> None:
        super().__init__(scale.shape[1], scale.shape[0] * Q5_GROUP, bias, dtype, max_rows)
        self.register_buffer("codes", codes)                                       # [N/32, K/4, 64] uint8
        self.register_buffer("hbits", hbits)                                       # [N/32, K/4, 2] int64
        self.register_buffer("scale", scale)                                       # [K/32, N] fp16

    @staticmethod
    def check_shape(N: int, K: int) -> None:
        if N % 32 or K % Q5_GROUP:
            raise ConfigError(f"q5 needs out_features and in_features divisible by 32, got {N} x {K}")

    @classmethod
    def from_codes(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                   max_rows: int) -> Q5Linear:
        """codes 0..31 ``[N, K]``, scales ``[N, K/32]`` (fp16 values): the PyTorch packing (the
        native one, :func:`kvoffload.kernels.qweights.q5_pack`, reads GGUF blocks)."""
        N, K = q.shape
        cls.check_shape(N, K)
        # row 32b + 16·half + 4·l + j, input 4t + 2·nib + e  ->  nibble nib of byte 16·l + 8·half + 2·j + e
        qb = q.to(torch.uint8).view(N // 32, 2, 4, 4, K // 4, 2, 2).permute(0, 4, 5, 2, 1, 3, 6)
        qb = qb.reshape(N // 32, K // 4, 2, 64)                                     # [b, t, nib, byte]
        codes = ((qb[:, :, 0] & 15) | ((qb[:, :, 1] & 15) << 4)).contiguous()        # [N/32, K/4, 64]
        bits = (qb >> 4).numpy()
        hbits = torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little").view("<i8")[..., 0].copy())   # [N/32, K/4, 2]
        return cls(codes, hbits, d.T.to(torch.float16).contiguous(), bias, dtype, max_rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> Q5Linear:
        """Symmetric groups of 32 (d = max|w| / 15 in fp16, q = round(w / d) + 16): for tests and
        measurements; checkpoints bring their own Q5_0 codes."""
        w = linear.weight.detach().float()
        N, K = w.shape
        cls.check_shape(N, K)
        wg = w.view(N, K // Q5_GROUP, Q5_GROUP)
        d = (wg.abs().amax(-1) / 15).to(torch.float16).float()                     # [N, K/32]
        q = (torch.round(wg / d.clamp(min=1e-30)[..., None]) + 16).clamp(0, 31).view(N, K)
        return cls.from_codes(q, d, linear.bias, dtype, max_rows)

    def codes_of(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """The codes 0..31 of rows ``n0:n1`` (default all) ``[n1-n0, K]`` int32 (the layout's
        reference reading; only the blocks holding those rows are unpacked)."""
        N, K = self.out_features, self.in_features
        n1 = N if n1 is None else n1
        b0, b1 = n0 // 32, -(-n1 // 32)
        nb = b1 - b0
        c = self.codes[b0:b1].to(torch.int32)                                      # [nb, K/4, 64]
        bits = np.unpackbits(self.hbits[b0:b1].numpy().view(np.uint8).reshape(nb, K // 4, 2, 8), axis=-1,
                             bitorder="little")
        bits = torch.from_numpy(bits.astype(np.int32))                              # [nb, K/4, nib, 64]
        q = torch.stack([c & 15, c >> 4], 2) | (bits << 4)                           # [nb, K/4, nib, byte]
        q = q.view(nb, K // 4, 2, 4, 2, 4, 2).permute(0, 4, 3, 5, 1, 2, 6).reshape(nb * 32, K)
        return q[n0 - 32 * b0:n1 - 32 * b0]

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_mm(x)

    def dequantize_t(self, n0: int, n1: int, buf: torch.Tensor) -> torch.Tensor:
        out = buf.view(self.in_features, n1 - n0)                                   # [K, n]
        if not q5_dequant_t(self.codes, self.hbits, self.scale, n0, n1, out):
            out.copy_(self.reference_rows(n0, n1).T)
        return out

    def reference_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Rows ``n0:n1`` ``[n1-n0, K]`` dequantised by PyTorch ((q - 16)·d, rounded once to the
        dtype): the native kernel's reference and fallback."""
        d = self.scale.T[n0:n1].float().repeat_interleave(Q5_GROUP, 1)              # [n, K]
        return ((self.codes_of(n0, n1) - 16).float() * d).to(self.dtype)


class Int8Embedding(nn.Module):
    """Token embeddings read from an int8 LM head whose weight they share (tied checkpoints)."""

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head.rows(tokens)                                              # [*tokens.shape, d]


QUANTIZERS = {"int8": Int8Linear, "int4": Int4Linear}          # the ``--quantization`` choices
FORMATS = {**QUANTIZERS, "q5": Q5Linear}                        # every decode format (tests run over it)


# The LM head (often tied to the embedding) is kept at 8 bits even under int4: checkpoints
# store it at higher precision (SmolLM2's GGUF: Q8_0), and int4 there alone cost SmolLM2
# +5.3% perplexity on pydoc text, against +0.9% with an int8 head (benchmarks/quality.md).
HEAD_METHOD = {"int8": "int8", "int4": "int8", "q5": "int8"}


def weight_formats(model: nn.Module) -> str:
    """The decode formats of a model's linear layers and how many of each (``"int8 25, q5 60"``;
    ``""`` when none is quantised)."""
    from collections import Counter

    n = Counter(m.format for m in model.modules() if isinstance(m, QuantLinear))
    return ", ".join(f"{k} {v}" for k, v in sorted(n.items()))


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
                cls = FORMATS[HEAD_METHOD[method] if child is head else method]
                setattr(module, name, cls.from_linear(child, dtype, max_rows))
    if tied:
        model.embed = Int8Embedding(model.lm_head)
