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
    """Precomputed cos/sin tables; ``forward`` rotates q and k heads in one pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
        pos = torch.arange(cfg.max_position, dtype=torch.float32)
        freqs = torch.outer(pos, inv)                         # [T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat([cos, cos], -1), persistent=False)   # [T, D]
        # sign of rotate_half folded in: rotate_half(x) * sin == swap_halves(x) * sin_signed
        self.register_buffer("sin_signed", torch.cat([-sin, sin], -1), persistent=False)
        self.half = cfg.head_dim // 2

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, H, D]``, positions ``[B, L]`` -> rotated ``[B, L, H, D]``."""
        cos = self.cos[positions].unsqueeze(2).to(x.dtype)          # [B, L, 1, D]
        sin = self.sin_signed[positions].unsqueeze(2).to(x.dtype)   # [B, L, 1, D]
        swapped = torch.cat((x[..., self.half:], x[..., :self.half]), dim=-1)
        return torch.addcmul(x * cos, swapped, sin)
