"""Weight-only quantisation of the linear layers (CPU packed kernels).

``int8``: symmetric per-output-channel int8 (scale = max|w| / 127), multiplied by
``torch._weight_int8pack_mm``, which reads 1 byte per weight instead of 4 (fp32) or 2
(bf16). Activations stay in the compute dtype. The model code is unchanged: the
``nn.Linear`` modules are swapped for :class:`Int8Linear` after loading.
"""

from __future__ import annotations

import torch
from torch import nn

from kvoffload.errors import ConfigError


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        w = linear.weight.detach().float()                          # [N, K]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0        # [N]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.out_features = q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Swap every ``nn.Linear`` (incl. the LM head, which gets its own copy when tied)."""
    if device.type != "cpu":
        raise ConfigError("int8 weights use a CPU kernel; on CUDA use --weights bfloat16")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, dtype))
