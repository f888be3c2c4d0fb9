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

import numpy as np
import torch

from kvoffload.sparse.base import Selection, SparsePolicy, group_max


@dataclass
class ChannelCopy:
    k: torch.Tensor                  # [H_kv, D, capacity] keys, channel-major (fp32): each query head
    #                                  reads r whole channel rows, best streamed as long runs
    vsum: torch.Tensor               # [H_kv, D] running sum of the values (fp32)
    hdr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))   # [tokens appended]
    probs: torch.Tensor | None = field(default=None, repr=False)   # [H_kv, G, T] of this step

    @property
    def n(self) -> int:
        return int(self.hdr[0])


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

    def capacity(self, st: ChannelCopy) -> int:
        return st.k.shape[2]

    def grow(self, st: ChannelCopy, tokens: int) -> None:
        grown = torch.empty(self.H_kv, self.D, tokens, device=self.device)
        grown[:, :, :st.n] = st.k[:, :, :st.n]
        st.k = grown

    def native_row(self, st: ChannelCopy) -> tuple[int, ...]:
        return (st.k.data_ptr(), st.vsum.data_ptr(), 0, st.hdr.ctypes.data, st.k.shape[2])

    def native_args(self) -> dict:
        return {"r": self.r}

    def update(self, st: ChannelCopy, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        self.reserve(st, end)
        st.k[:, :, start:end] = k.float().transpose(1, 2)
        st.vsum += v.float().sum(1)
        st.hdr[0] = max(st.n, end)

    def score(self, st: ChannelCopy, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        H_kv, G, D = q.shape
        # the r largest |q| channels, ties toward the lower channel (as the native kernel: bf16
        # queries tie often)
        idx = q.abs().sort(dim=-1, descending=True, stable=True).indices[..., :self.r]   # [H_kv, G, r]
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
