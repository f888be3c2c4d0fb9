"""Attention math on one sequence's contiguous K/V (shared by every backend).

The decode form is written out (GQA by reshaping q, fp32 softmax) rather than
through SDPA: for a single query row it avoids SDPA's per-call setup and lets a
caller get the log-sum-exp needed to merge partial results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token over T keys.

    q ``[H, D]``, k and v ``[H_kv, T, D]`` -> ``[H, D]`` in q's dtype.
    """
    H, D = q.shape
    H_kv = k.shape[0]
    dt = torch.promote_types(q.dtype, k.dtype)         # fp32 q over bf16 KV: fp32 math
    qg = q.reshape(H_kv, H // H_kv, D).to(dt)                          # [H_kv, G, D]
    scores = torch.matmul(qg, k.to(dt).transpose(1, 2)).float()        # [H_kv, G, T]
    probs = torch.softmax(scores.mul_(1.0 / math.sqrt(D)), dim=-1)
    out = torch.matmul(probs.to(dt), v.to(dt))                         # [H_kv, G, D]
    return out.reshape(H, D).to(q.dtype)


def causal_mask(L: int, start: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive ``[L, start+L]`` mask: query i (absolute start+i) sees keys j <= start+i.

    Built once per forward and shared by all layers (SDPA would otherwise turn a boolean
    mask into this on every call).
    """
    allowed = torch.ones(L, start + L, dtype=torch.bool, device=device).tril_(diagonal=start)
    return torch.zeros(L, start + L, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def needs_mask(start: int, device: torch.device) -> bool:
    """Whether :func:`prefill_attention` uses an explicit mask for a chunk starting at ``start``
    (on the CPU later chunks take the mask-free split path instead)."""
    return start > 0 and device.type != "cpu"


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """L query tokens at positions ``start .. start+L-1`` over keys ``0 .. start+L-1``, causal.

    q ``[H, L, D]``, k and v ``[H_kv, start+L, D]`` -> ``[L, H, D]``.
    (SDPA gets 4-D tensors: with 3-D ones PyTorch's CPU flash kernel is skipped for the
    math fallback, ~10x slower.)
    """
    L = q.shape[1]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if start > 0 and not needs_mask(start, q.device):
        return split_prefill_attention(q, k, v, start).transpose(0, 1)
    q, k, v = q[None], k[None], v[None]                                # [1, H(_kv), *, D]
    if start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        if mask is None:
            mask = causal_mask(L, start, q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)                                      # [L, H, D]


def split_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """A later prefill chunk as two flash calls merged by log-sum-exp: the whole prefix
    (no mask; the G query heads of a KV head folded into its query rows) and the chunk
    itself (``is_causal``, which lets the kernel skip masked blocks). 1.2-1.7x faster on the
    CPU than one masked call, which cannot skip anything.

    q ``[H, L, D]``, k and v ``[H_kv, start+L, D]`` -> ``[H, L, D]``.
    """
    H, L, D = q.shape
    H_kv = k.shape[0]
    G = H // H_kv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu     # returns (out, lse)
    o_pre, lse_pre = flash(q.reshape(H_kv, G * L, D)[None], k[None, :, :start], v[None, :, :start])[:2]
    o_pre, lse_pre = o_pre[0].reshape(H, L, D), lse_pre[0].reshape(H, L)   # [H, L, D], [H, L]
    k_c = k[:, start:].repeat_interleave(G, 0)[None]                       # [1, H, L, D] (small)
    v_c = v[:, start:].repeat_interleave(G, 0)[None]
    o_c, lse_c = flash(q[None], k_c, v_c, is_causal=True)[:2]
    o_c, lse_c = o_c[0], lse_c[0]
    m = torch.maximum(lse_pre, lse_c)
    w_pre, w_c = torch.exp(lse_pre - m)[..., None], torch.exp(lse_c - m)[..., None]
    return ((o_pre.float() * w_pre + o_c.float() * w_c) / (w_pre + w_c)).to(q.dtype)


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


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """One query token over the chosen keys of each KV head (sparse decode, reference form).

    q ``[H, D]``; k, v ``[H_kv, T, D]``; idx ``[H_kv, n]`` positions each head attends, padded
    where ``valid`` ``[H_kv, n]`` is False -> ``[H, D]`` fp32.
    """
    H, D = q.shape
    H_kv, cap = k.shape[0], k.shape[1]
    rows = (idx + torch.arange(H_kv, device=idx.device)[:, None] * cap).reshape(-1)     # into [H_kv*cap]
    ks = k.reshape(H_kv * cap, D).index_select(0, rows).view(H_kv, -1, D).float()  # [H_kv, n, D]
    vs = v.reshape(H_kv * cap, D).index_select(0, rows).view(H_kv, -1, D).float()
    s = torch.matmul(q.float().reshape(H_kv, H // H_kv, D), ks.transpose(1, 2)) * (1.0 / math.sqrt(D))
    s.masked_fill_(~valid[:, None, :], float("-inf"))                              # [H_kv, G, n]
    return torch.matmul(torch.softmax(s, dim=-1), vs).reshape(H, D)


def attend_lse_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_lse` where KV head h sees only the keys with ``valid[h]`` (``[H_kv, T]``
    bool): q ``[H, L, D]`` -> o ``[H, L, D]``, lse ``[H, L]`` fp32 (-inf, o = 0 with no key)."""
    H, L, D = q.shape
    H_kv = k.shape[0]
    qg = q.reshape(H_kv, (H // H_kv) * L, D).float()
    s = torch.matmul(qg, k.float().transpose(1, 2)) * (1.0 / math.sqrt(D))          # [H_kv, G*L, T]
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                                # [H_kv, G*L]
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    o = torch.matmul(p, v.float())
    return o.reshape(H, L, D), lse.reshape(H, L)
