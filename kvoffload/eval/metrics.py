"""Logit metrics that need no task skill: perplexity, and top-1 agreement / KL against a reference.

All take teacher-forced logits (``[N, V]``, row i predicting ``targets[i]``) and work in
float32, a block of rows at a time, so a 150K-word vocabulary at 8K positions stays small.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

ROWS = 512          # rows per block of the float32 softmax


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N]`` negative log-likelihood of each target under ``logits`` ``[N, V]``."""
    out = []
    for s in range(0, logits.shape[0], ROWS):
        logp = torch.log_softmax(logits[s:s + ROWS].float(), -1)                       # [n, V]
        out.append(-logp.gather(1, targets[s:s + ROWS, None].to(logp.device))[:, 0])  # [n]
    return torch.cat(out).cpu()


def agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: top-1 match ``[N]`` (bool) and ``KL(ref || run)`` ``[N]`` (nats, float32)."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs reference {tuple(ref_logits.shape)}")
    agree, kl = [], []
    for s in range(0, logits.shape[0], ROWS):
        logp = torch.log_softmax(logits[s:s + ROWS].float(), -1)                        # [n, V]
        ref = torch.log_softmax(ref_logits[s:s + ROWS].float(), -1)                     # [n, V]
        agree.append(logp.argmax(-1) == ref.argmax(-1))                                # [n]
        kl.append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0.0))                    # [n]
    return torch.cat(agree).cpu(), torch.cat(kl).cpu()


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


@dataclass(frozen=True)
class Bucket:
    """Agreement over the positions ``[lo, hi)``."""

    lo: int
    hi: int
    tokens: int
    top1: float          # % of positions whose argmax matches the reference
    kl: float            # mean KL(ref || run), nats


def bucket_edges(max_pos: int, first: int = 512) -> list[int]:
    """``0, first, 2·first, 4·first, ...`` up to past ``max_pos``: position buckets that double."""
    edges, e = [0], first
    while edges[-1] <= max_pos:
        edges.append(e)
        e *= 2
    return edges


def bucketize(positions: list[int], agree: list[int], kl: list[float], edges: list[int]) -> list[Bucket]:
    """Group per-position agreement / KL into the buckets ``[edges[i], edges[i+1])`` that hold any."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        idx = [i for i, p in enumerate(positions) if lo <= p < hi]
        if idx:
            out.append(Bucket(lo, hi, len(idx), 100.0 * sum(agree[i] for i in idx) / len(idx),
                              sum(kl[i] for i in idx) / len(idx)))
    return out
