"""Offline channel calibration for Double Sparsity: which key channels carry the attention.

:class:`ChannelRecorder` is an attention backend for whole-block prefills (causal attention
within each block, nothing cached) that accumulates, per layer and KV head, the sum over
tokens of ``|q * k|`` per channel (post-RoPE query and key of the same token, the G query
heads of the group summed). :func:`channel_file` ranks the channels by that mean, descending:
the order ``double_sparsity`` reads its top ``r`` from. Every block counts (the authors'
script keeps only the last block's statistics by a dict-key slip).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.nn.functional as F

from kvoffload.config import ModelConfig
from kvoffload.model.interface import ForwardBatch
from kvoffload.sparse.double_sparsity import CALIBRATION_FORMAT


class ChannelRecorder:
    """The AttentionBackend the model runs calibration blocks through."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.sums = torch.zeros(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float64)
        self.tokens = 0

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        B, H, L, D = q.shape
        H_kv = k.shape[1]
        qg = q.float().view(B, H_kv, H // H_kv, L, D)                       # [B, H_kv, G, L, D]
        self.sums[layer] += (qg * k.float()[:, :, None]).abs().sum(dim=(0, 2, 3)).double()   # [H_kv, D]
        if layer == 0:
            self.tokens += B * L
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)   # [B, H, L, D]
        return out.transpose(1, 2)                                          # [B, L, H, D]

    def decode(self, layer, q, k, v, batch):
        raise NotImplementedError("calibration runs whole-block prefills only")

    def channel_order(self) -> torch.Tensor:
        """``[layers, H_kv, D]`` channel indices, most important first (ties: lower index)."""
        mean = self.sums / max(1, self.tokens)
        return torch.sort(-mean, dim=-1, stable=True).indices


def channel_file(recorder: ChannelRecorder, path: str, meta: dict) -> None:
    """Write the ranking (and ``meta``: model, blocks, seed...) to ``path`` atomically."""
    mean = recorder.sums / max(1, recorder.tokens)
    data = {"format": CALIBRATION_FORMAT, **meta, "tokens": recorder.tokens,
            "statistic": "mean |q*k| per channel, post-RoPE, query heads of a group summed",
            "channels": recorder.channel_order().tolist(),
            "scores": [[[round(float(x), 6) for x in h] for h in layer] for layer in mean]}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".calib-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
