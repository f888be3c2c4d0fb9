"""Quest (Tang et al., arXiv 2406.10774): query-aware page selection from per-page key bounds.

Metadata per (sequence, layer, KV head): the channel-wise min and max of the keys of every
full block (a Quest page; 16 tokens, as in the authors' scripts). A block's score is the upper
bound of any of its tokens' dot products with the query, ``sum_d max(q_d * kmax_d, q_d *
kmin_d)``; the highest blocks are read whole. Defaults: layers 0 and 1 dense (as Quest); no
forced sinks or window beyond the tail block (Quest scores every page). With GQA a block
counts as much as it does for the group's query head that bounds it highest (Quest's models
are MHA). The bounds cost 2 x D values per block and head, 1/bs of K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvoffload.sparse.base import SparsePolicy, group_max


@dataclass
class Bounds:
    kmin: torch.Tensor      # [H_kv, blocks, D] fp32 (+inf where no token yet)
    kmax: torch.Tensor      # [H_kv, blocks, D] fp32 (-inf where no token yet)


class Quest(SparsePolicy):
    name = "quest"
    dense_layers = (0, 1)

    def new_state(self, layer: int, capacity: int) -> Bounds:
        n = -(-max(capacity, 1) // self.bs)
        shape = (self.H_kv, n, self.D)
        return Bounds(torch.full(shape, float("inf"), device=self.device),
                      torch.full(shape, float("-inf"), device=self.device))

    def update(self, st: Bounds, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        bs, L = self.bs, k.shape[1]
        off, b0 = start % bs, start // bs
        if L == 1 and b0 < st.kmin.shape[1]:                 # a decode step: fold one key in
            kf = k[:, 0].float()                                          # [H_kv, D]
            torch.minimum(st.kmin[:, b0], kf, out=st.kmin[:, b0])
            torch.maximum(st.kmax[:, b0], kf, out=st.kmax[:, b0])
            return
        nb = -(-(off + L) // bs)
        if b0 + nb > st.kmin.shape[1]:                       # past the capacity given: grow
            extra = b0 + nb - st.kmin.shape[1]
            st.kmin = F.pad(st.kmin, (0, 0, 0, extra), value=float("inf"))
            st.kmax = F.pad(st.kmax, (0, 0, 0, extra), value=float("-inf"))
        pad = (0, 0, off, nb * bs - off - L)
        kf = k.float()                                                    # [H_kv, L, D]
        lo = F.pad(kf, pad, value=float("inf")).view(self.H_kv, nb, bs, self.D).amin(2)
        hi = F.pad(kf, pad, value=float("-inf")).view(self.H_kv, nb, bs, self.D).amax(2)
        torch.minimum(st.kmin[:, b0:b0 + nb], lo, out=st.kmin[:, b0:b0 + nb])
        torch.maximum(st.kmax[:, b0:b0 + nb], hi, out=st.kmax[:, b0:b0 + nb])

    def score(self, st: Bounds, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        # max(q_d kmax_d, q_d kmin_d) is q_d kmax_d where q_d >= 0, else q_d kmin_d: two matmuls
        pos, neg = q.clamp(min=0), q.clamp(max=0)                         # [H_kv, G, D]
        bound = torch.matmul(pos, st.kmax[:, lo:hi].transpose(1, 2)) \
            + torch.matmul(neg, st.kmin[:, lo:hi].transpose(1, 2))        # [H_kv, G, n]
        return group_max(bound)
