"""Weight-only quantisation of the linear layers for decode (CPU packed kernels).

* ``int8``: symmetric per-output-channel int8 (scale = max|w| / 127),
  ``torch._weight_int8pack_mm``; 1 byte per weight.
* ``int4``: asymmetric groups of 32 along the input dimension (w = (q - 8)·scale + zero,
  q in 0..15), ``torch._weight_int4pack_mm_for_cpu``; ~0.6 byte per weight. A GGUF
  Q4_1 weight (w = d·q + m per 32) is re-packed losslessly: min/max of its group give
  back d and m, and fp32 scales hold them exactly (bf16 scales round them).

These kernels win only for a few rows (decode at small batch): on this CPU int4 at
M=1 reads the SmolLM2 weights in ~6 ms vs ~17–20 ms for bf16/fp32, while at M=512
it is ~7x slower than a bf16 GEMM. So each layer keeps its dense weight too and
picks per call: the packed kernel up to ``max_rows`` rows, the dense GEMM above.
(The model code is unchanged: ``nn.Linear`` modules are swapped after loading.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvoffload.errors import ConfigError

INT4_GROUP = 32


class QuantLinear(nn.Module):
    """Packed weight for few rows, dense weight for many."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> None:
        super().__init__()
        self.register_buffer("dense", linear.weight.detach().to(dtype))     # [N, K] (shared when tied)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.out_features, self.in_features = self.dense.shape
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return F.linear(x, self.dense, self.bias)
        y = self.packed_mm(x.reshape(rows, self.in_features))       # [rows, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> None:
        super().__init__(linear, dtype, max_rows)
        w = linear.weight.detach().float()                          # [N, K]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0        # [N]
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.q, self.scale)

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


class Int4Linear(QuantLinear):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype, max_rows: int) -> None:
        super().__init__(linear, dtype, max_rows)
        w = linear.weight.detach().float()                          # [N, K]
        N, K = w.shape
        if K % INT4_GROUP:
            raise ConfigError(f"int4 needs in_features divisible by {INT4_GROUP}, got {K}")
        wg = w.view(N, K // INT4_GROUP, INT4_GROUP)
        lo, hi = wg.amin(-1), wg.amax(-1)                           # [N, K/g]
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 2))
        zero = lo + 8 * scale
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], -1).to(dtype).contiguous())  # [K/g, N, 2]

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scale_zero)


QUANTIZERS = {"int8": Int8Linear, "int4": Int4Linear}


# The LM head (often tied to the embedding) is kept at 8 bits even under int4: checkpoints
# store it at higher precision (SmolLM2's GGUF: Q8_0), and int4 there alone cost SmolLM2
# +5.3% perplexity on pydoc text, against +0.9% with an int8 head (benchmarks/quality.md).
HEAD_METHOD = {"int8": "int8", "int4": "int8"}


def quantize(model: nn.Module, method: str, dtype: torch.dtype, device: torch.device, max_rows: int) -> None:
    """Swap every ``nn.Linear`` for its packed version (the LM head per :data:`HEAD_METHOD`)."""
    if device.type != "cpu":
        raise ConfigError(f"{method} weights use a CPU kernel; on CUDA run without --quantization")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                cls = QUANTIZERS[HEAD_METHOD[method] if child is getattr(model, "lm_head", None) else method]
                setattr(module, name, cls(child, dtype, max_rows))
