"""Exact merge of partial attention results computed over disjoint sets of keys.

Each part is normalised within its own keys and carries its log-sum-exp; then
``lse = log sum_i exp(lse_i)`` and ``o = sum_i exp(lse_i - lse) * o_i``. A part with no keys
has ``lse = -inf`` and weight 0. The numpy form runs in disk workers (which never import torch).
"""

from __future__ import annotations

import numpy as np


def merge_torch(parts):
    """parts: ``[(o [..., D] fp32, lse [...] fp32), ...]`` -> (o, lse)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)          # [...]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    o = sum(torch.exp(p[1] - safe)[..., None] * p[0] for p in parts)
    return o, lse


def merge_np(o1: np.ndarray, lse1: np.ndarray, o2: np.ndarray, lse2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.maximum(lse1, lse2)
    safe = np.where(np.isinf(m), 0.0, m).astype(np.float32)
    w1, w2 = np.exp(lse1 - safe), np.exp(lse2 - safe)                          # -inf -> weight 0
    tot = w1 + w2
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(tot[..., None] > 0, (o1 * w1[..., None] + o2 * w2[..., None]) / tot[..., None], 0.0)
        lse = np.where(tot > 0, safe + np.log(tot), -np.inf)
    return o.astype(np.float32), lse.astype(np.float32)
