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


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """``[V]`` logits with the request's repetition penalties applied (a new tensor):
    llama.cpp's ``repeat_penalty`` over the last ``repeat_last_n`` tokens of prompt and output,
    then OpenAI's ``presence_penalty`` / ``frequency_penalty`` over the output."""
    x = logits.float().clone()
    if params.repeat_penalty != 1.0 and params.repeat_last_n:
        recent = (prompt_ids + output_ids)[-params.repeat_last_n:]
        idx = torch.tensor(sorted(set(recent)), dtype=torch.long, device=x.device)
        v = x[idx]
        x[idx] = torch.where(v > 0, v / params.repeat_penalty, v * params.repeat_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long, device=x.device).unique(return_counts=True)
        x[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()
    return x


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """``[N, V]`` logits and the ``[N]`` tokens chosen at each row -> the chosen tokens'
    log-probabilities and per row the ``k`` most likely (token, log-probability), best first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, chosen[:, None].to(lp.device))[:, 0].tolist()
    if k == 0:
        return picked, [[] for _ in picked]
    vals, idx = torch.topk(lp, k, dim=-1)
    return picked, [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], histories: list[tuple[list[int], list[int]]] | None = None,
           ) -> list[int]:
    """``[B, V]`` logits -> one token per row (``histories``: per row the (prompt, output) token
    ids the repetition penalties look at; needed only when a request has penalties)."""
    if histories is not None and any(p.penalized for p in params):
        logits = torch.stack([apply_penalties(row, p, *h) if p.penalized else row
                              for row, p, h in zip(logits, params, histories)])
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, p, gen, g in zip(logits, params, generators, greedy):
        if p.greedy:
            out.append(g)
        else:
            out.append(int(torch.multinomial(processed_probs(row, p), 1, generator=gen)))
    return out


def draft_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                ) -> tuple[int, torch.Tensor | None]:
    """A draft's ``[V]`` logits -> (its token, the ``[V]`` probabilities it was drawn from;
    ``None`` when greedy)."""
    if params.greedy:
        return int(logits.argmax()), None
    q = processed_probs(logits, params)
    return int(torch.multinomial(q, 1, generator=generator)), q


def speculative_accept(target_logits: torch.Tensor, draft: list[int], draft_probs: list[torch.Tensor | None],
                       params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the target's ``[g+1, V]``
    logits at the g draft positions and one past them -> the accepted draft tokens followed by
    one token of the target's own (the correction at the first rejection, else the bonus).

    Draft token i is accepted with probability ``min(1, p_i(x) / q_i(x))``; at the first
    rejection the token is drawn from ``max(0, p_i - q_i)`` renormalised; if all g are accepted
    the bonus is drawn from ``p_g``. Each output token is then distributed exactly as the
    target's (p after temperature / top-k / top-p). Greedy: accept while the draft equals the
    target's argmax, then the argmax.
    """
    g = len(draft)
    if params.greedy:
        best = target_logits.argmax(dim=-1).tolist()                   # [g+1]
        out = []
        for i in range(g):
            if draft[i] != best[i]:
                break
            out.append(draft[i])
        out.append(best[len(out)])
        return out
    out = []
    for i in range(g):
        p = processed_probs(target_logits[i], params)
        q = draft_probs[i]
        x = draft[i]
        ratio = float(p[x]) / max(float(q[x]), 1e-30)
        r = float(torch.rand((), generator=generator, device=p.device))
        if r < min(1.0, ratio):
            out.append(x)
            continue
        residual = (p - q.to(p.device)).clamp_(min=0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    p = processed_probs(target_logits[g], params)
    out.append(int(torch.multinomial(p, 1, generator=generator)))
    return out
