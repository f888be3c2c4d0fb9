"""SparF, InstInfer's flash-aware SparQ (Pan et al., arXiv 2409.04992; SparQ: Ribar et al.,
arXiv 2312.04985).

Per decode step and query head: take the ``r`` channels of the query with the largest |q|;
read only those channels of K from a channel-indexed copy (InstInfer keeps K twice, token- and
channel-indexed); approximate scores ``s^ = softmax(q[r] . K[:, r] / sqrt(D * |q[r]|_1 / |q|_1))``
over every token; keep the top-k tokens. A 16-token block is read when any of its tokens is
chosen (page-then-token filtering) and exact attention runs over the chosen tokens only; the
output is then ``alpha * o + (1 - alpha) * mean(V)`` with ``alpha`` the approximate mass of the
attended tokens (SparQ's correction for the mass left out).

Defaults: ``r = D / 4`` (``--sparse-channels``; SparQ's r = 32 of 128); every layer sparse; no
forced sinks or window beyond the tail block (SparQ keeps none). The channel-indexed K copy
lives beside the policy (host memory here; on a computational-storage drive it would be a
second flash layout), and the running sum of V gives ``mean(V)``. With GQA a token counts as
much as it does for the group's query head that weights it most.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvoffload.sparse.base import Selection, SparsePolicy, group_max


@dataclass
class ChannelCopy:
    k: torch.Tensor                  # [H_kv, D, capacity] keys, channel-major (fp32)
    vsum: torch.Tensor               # [H_kv, D] running sum of the values (fp32)
    n: int = 0
    probs: torch.Tensor | None = field(default=None, repr=False)   # [H_kv, G, T] of this step


class SparF(SparsePolicy):
    name = "sparf"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.r = min(self.D, self.cfg.sparse_channels or max(1, self.D // 4))

    @property
    def unit(self) -> int:
        return 1

    def new_state(self, layer: int, capacity: int) -> ChannelCopy:
        return ChannelCopy(torch.empty(self.H_kv, self.D, max(16, capacity), device=self.device),
                           torch.zeros(self.H_kv, self.D, device=self.device))

    def update(self, st: ChannelCopy, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        if end > st.k.shape[2]:
            grown = torch.empty(self.H_kv, self.D, max(end, 2 * st.k.shape[2]), device=self.device)
            grown[:, :, :st.n] = st.k[:, :, :st.n]
            st.k = grown
        st.k[:, :, start:end] = k.float().transpose(1, 2)
        st.vsum += v.float().sum(1)
        st.n = max(st.n, end)

    def score(self, st: ChannelCopy, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        H_kv, G, D = q.shape
        idx = q.abs().topk(self.r, dim=-1).indices                       # [H_kv, G, r]
        q_r = q.gather(-1, idx)                                           # [H_kv, G, r]
        # the r chosen channel rows of the channel-major K copy (contiguous rows: what a
        # channel-indexed layout makes cheap to read)
        rows = (idx + torch.arange(H_kv, device=idx.device)[:, None, None] * D).reshape(-1)
        k_r = st.k.reshape(H_kv * D, -1)[:, :length].index_select(0, rows)   # [H_kv*G*r, T]
        s = torch.bmm(q_r.reshape(H_kv * G, 1, self.r),
                      k_r.view(H_kv * G, self.r, length)).view(H_kv, G, length)   # [H_kv, G, T]
        # SparQ's temperature: the share of |q| the r channels carry
        frac = q_r.abs().sum(-1, keepdim=True) / q.abs().sum(-1, keepdim=True).clamp_min(1e-30)
        st.probs = torch.softmax(s / torch.sqrt(D * frac), dim=-1)
        bs = self.bs
        return group_max(st.probs[:, :, lo * bs:hi * bs])

    def finish(self, st: ChannelCopy, q: torch.Tensor, length: int, blocks, masks) -> Selection:
        sel = Selection(blocks, masks)
        if st.probs is None:             # nothing was scored: everything in the budget is fixed
            self.score(st, q, 0, 0, length)
        idx, valid = sel.token_index(length, self.bs)                     # [H_kv, T_max]
        attended = torch.zeros(self.H_kv, length, device=self.device)
        attended.scatter_add_(1, idx.to(self.device), valid.float().to(self.device)).clamp_(max=1.0)
        alpha = (st.probs * attended[:, None]).sum(-1)                    # [H_kv, G]
        st.probs = None
        sel.alpha = alpha.reshape(-1)                                     # [H]
        sel.vmean = st.vsum / st.n                                        # [H_kv, D]
        return sel
