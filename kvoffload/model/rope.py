"""Rotary position embedding (rotate-half convention, as in HF Llama/Qwen2).

GGUF ``llama`` checkpoints store q/k rows permuted for llama.cpp's interleaved
RoPE; the loader undoes that so one convention serves every checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvoffload.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """``[head_dim // 2]`` float64 inverse frequencies, scaled as the checkpoint asks."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    if scaling.freq_factors is not None:
        return inv / torch.tensor(scaling.freq_factors, dtype=torch.float64)
    if scaling.kind == "linear":
        return inv / scaling.factor
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)


class Rope(nn.Module):
    """Precomputed fp32 cos/sin tables, gathered once per forward for all layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
        pos = torch.arange(cfg.max_position, dtype=torch.float32)
        freqs = torch.outer(pos, inv)                         # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat([cos, cos], -1), persistent=False)   # [T, D]
        # sign of rotate_half folded in: rotate_half(x) * sin == swap_halves(x) * sin_signed
        self.register_buffer("sin_signed", torch.cat([-sin, sin], -1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[B, L]`` -> (cos, signed sin), each ``[B, L, 1, D]``; once per forward."""
        return (self.cos[positions].unsqueeze(2).to(dtype),
                self.sin_signed[positions].unsqueeze(2).to(dtype))


def apply_rope(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x ``[B, L, H, D]`` rotated by the tables of :meth:`Rope.forward`."""
    cos, sin = rot
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)
