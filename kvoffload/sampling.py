"""Pure functions from logits to tokens (a leaf module: engine and spec both use it)."""

from __future__ import annotations

import torch

from kvoffload.config import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """Per-request RNG: same seed -> same samples, whatever else is in the batch."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[V]`` logits -> ``[V]`` probabilities after temperature, top-k and top-p (non-greedy)."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        p = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top one always stays)
        drop_sorted = (torch.cumsum(p, dim=-1) - p) >= params.top_p
        x = x.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return torch.softmax(x, dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """``[B, V]`` logits -> one token per row."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, p, gen, g in zip(logits, params, generators, greedy):
        if p.greedy:
            out.append(g)
        else:
            out.append(int(torch.multinomial(processed_probs(row, p), 1, generator=gen)))
    return out
