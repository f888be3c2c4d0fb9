"""Attention math on one sequence's contiguous K/V (shared by every backend).

Decode attention runs the paged kernel (kernels/) over slots; these are the prompt-chunk forms
(flash attention on the CPU) and the log-sum-exp form a verify pass merges with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(L: int, start: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[L, start+L]`` mask: query i (absolute start+i) sees keys j <= start+i.

    Built once per forward and shared by all layers (SDPA would otherwise turn a boolean
    mask into this on every call).
    """
    allowed = torch.ones(L, start + L, dtype=torch.bool, device=device).tril_(diagonal=start)
    return torch.zeros(L, start + L, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def own_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A prompt chunk over its own keys (the first chunk, or any chunk of a sequence with no
    earlier KV), causal: q ``[H, L, D]``, k and v ``[H_kv, L, D]`` -> ``[L, H, D]``.
    (SDPA gets 4-D tensors: with 3-D ones PyTorch's CPU flash kernel is skipped for the math
    fallback, ~10x slower.)"""
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)
    return out[0].transpose(0, 1)                                      # [L, H, D]


def prefix_attention(q: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, k_own: torch.Tensor,
                     v_own: torch.Tensor) -> torch.Tensor:
    """A later prompt chunk: L queries over the T earlier tokens and, causally, over their own.

    q ``[H, L, D]``; k_pre, v_pre ``[H_kv, T, D]``; k_own, v_own ``[H_kv, L, D]`` -> ``[L, H, D]``.
    Every backend calls this with the same tensors (the earlier tokens read back exactly from
    wherever they are stored), so a prefill's output does not depend on the placement.
    On the CPU: two flash calls merged by log-sum-exp — the whole prefix (no mask; the G query
    heads of a KV head folded into its query rows) and the chunk itself (``is_causal``, which
    lets the kernel skip masked blocks); 1.2-1.7x faster than one masked call. Elsewhere one
    SDPA call with the explicit causal mask.
    """
    H, L, D = q.shape
    H_kv, T = k_pre.shape[0], k_pre.shape[1]
    if k_pre.dtype != q.dtype:
        k_pre, v_pre, k_own, v_own = (t.to(q.dtype) for t in (k_pre, v_pre, k_own, v_own))
    if q.device.type != "cpu":
        k, v = torch.cat([k_pre, k_own], 1)[None], torch.cat([v_pre, v_own], 1)[None]
        mask = causal_mask(L, T, q.dtype, q.device)
        return F.scaled_dot_product_attention(q[None], k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    G = H // H_kv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu     # returns (out, lse)
    o_pre, lse_pre = flash(q.reshape(H_kv, G * L, D)[None], k_pre[None], v_pre[None])[:2]
    o_pre, lse_pre = o_pre[0].reshape(H, L, D), lse_pre[0].reshape(H, L)   # [H, L, D], [H, L]
    k_c = k_own.repeat_interleave(G, 0)[None]                              # [1, H, L, D] (small)
    v_c = v_own.repeat_interleave(G, 0)[None]
    o_c, lse_c = flash(q[None], k_c, v_c, is_causal=True)[:2]
    o_c, lse_c = o_c[0], lse_c[0]
    m = torch.maximum(lse_pre, lse_c)
    w_pre, w_c = torch.exp(lse_pre - m)[..., None], torch.exp(lse_c - m)[..., None]
    out = (o_pre.float() * w_pre + o_c.float() * w_c) / (w_pre + w_c)
    return out.to(q.dtype).transpose(0, 1)                                 # [L, H, D]


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """L queries over T keys, returning what partial results merge with.

    q ``[H, L, D]``, k and v ``[H_kv, T, D]`` -> o ``[H, L, D]`` fp32 and lse ``[H, L]`` fp32.
    ``causal``: T == L and query i sees keys 0..i (a prefill chunk over its own keys);
    otherwise every query sees every key (keys that precede the queries).
    """
    H, L, D = q.shape
    H_kv, T = k.shape[0], k.shape[1]
    G = H // H_kv
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if q.device.type == "cpu":
        # the CPU flash kernel silently misreads inputs whose last dim is strided
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if causal:     # per query head (the causal diagonal is per row), GQA by repeating K/V
            o, lse = flash(q[None], k.repeat_interleave(G, 0)[None], v.repeat_interleave(G, 0)[None],
                           is_causal=True)[:2]
            return o[0].float(), lse[0]
        o, lse = flash(q.reshape(H_kv, G * L, D)[None], k[None], v[None])[:2]   # G heads fold into rows
        return o[0].reshape(H, L, D).float(), lse[0].reshape(H, L)
    qg = q.reshape(H_kv, G * L, D).float()
    s = torch.matmul(qg, k.float().transpose(1, 2)) * (1.0 / math.sqrt(D))      # [H_kv, G*L, T]
    if causal:
        allowed = torch.ones(L, T, dtype=torch.bool, device=q.device).tril_()
        s = s.view(H_kv, G, L, T).masked_fill(~allowed, float("-inf")).view(H_kv, G * L, T)
    lse = torch.logsumexp(s, dim=-1)                                               # [H_kv, G*L]
    o = torch.matmul(torch.exp(s - lse[..., None]), v.float())                     # [H_kv, G*L, D]
    return o.reshape(H, L, D), lse.reshape(H, L)
