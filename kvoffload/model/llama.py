"""One decoder-only transformer for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

A plain ``nn.Module`` in the gpt-fast mould: it computes q, k, v and hands them to
the :class:`~kvoffload.model.interface.AttentionBackend` it was given; where the
KV cache lives, and how attention over it is computed, is the backend's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvoffload.config import ModelConfig
from kvoffload.model.interface import AttentionBackend, ForwardBatch, Logits
from kvoffload.model.rope import Rope, apply_rope

Rot = tuple[torch.Tensor, torch.Tensor]   # (cos, signed sin), each [B, L, 1, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias)   # q, k, v fused
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rot: Rot,
                backend: AttentionBackend) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, -1, self.head_dim)           # [B, L, H + 2*H_kv, D]
        qk = apply_rope(qkv[:, :, : self.heads + self.kv_heads], rot)
        q = qk[:, :, : self.heads].transpose(1, 2)                       # [B, H, L, D]
        k = qk[:, :, self.heads:].transpose(1, 2)                        # [B, H_kv, L, D]
        v = qkv[:, :, self.heads + self.kv_heads:].transpose(1, 2)       # [B, H_kv, L, D]
        o = getattr(backend, batch.phase.value)(self.layer, q, k, v, batch)   # [B, L, H, D]
        return self.o_proj(o.reshape(B, L, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ffn = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rot: Rot,
                backend: AttentionBackend) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), batch, rot, backend)
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nn.Module):
    """tokens ``[B, L]`` -> logits; the attention backend is an argument of ``forward``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = Rope(cfg)

    def forward(self, tokens: torch.Tensor, batch: ForwardBatch,
                backend: AttentionBackend) -> torch.Tensor | None:
        """Returns ``[B, V]`` (Logits.LAST), ``[B, L, V]`` (Logits.ALL) or None (Logits.NONE)."""
        x = self.embed(tokens)                                           # [B, L, d]
        rot = self.rope(batch.positions, x.dtype)
        for block in self.layers:
            x = block(x, batch, rot, backend)
        if batch.logits is Logits.NONE:
            return None
        if batch.logits is Logits.LAST:
            x = x[:, -1]                                                 # [B, d]
        return self.lm_head(self.norm(x)).float()
