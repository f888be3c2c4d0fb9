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

from kvoffload.sparse.base import (
    TILE,
    SparsePolicy,
    group_max,
    tiled,
    tiled_columns,
    tiled_grow,
    tiled_matmul,
    tiled_read,
    tiled_write,
)


@dataclass
class Bounds:
    kmin: torch.Tensor      # [H_kv, tiles, D, TILE] fp32, tiled channel-major over blocks (+inf: no token yet)
    kmax: torch.Tensor      # [H_kv, tiles, D, TILE] fp32 (-inf where no token yet)


class Quest(SparsePolicy):
    name = "quest"
    dense_layers = (0, 1)

    # tiled channel-major (base.tiled): the native kernel scores 16 blocks with D vector
    # multiply-adds per query head, streaming the bounds tile by tile
    def new_state(self, layer: int, capacity: int) -> Bounds:
        n = -(-max(capacity, 1) // self.bs)
        return Bounds(tiled(self.H_kv, self.D, n, float("inf"), self.device),
                      tiled(self.H_kv, self.D, n, float("-inf"), self.device))

    def capacity(self, st: Bounds) -> int:
        return tiled_columns(st.kmin) * self.bs

    def grow(self, st: Bounds, tokens: int) -> None:
        n = -(-tokens // self.bs)
        st.kmin = tiled_grow(st.kmin, n, float("inf"))
        st.kmax = tiled_grow(st.kmax, n, float("-inf"))

    def native_row(self, st: Bounds) -> tuple[int, ...]:
        return (st.kmin.data_ptr(), st.kmax.data_ptr(), 0, 0, tiled_columns(st.kmin))

    def update(self, st: Bounds, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        bs, L = self.bs, k.shape[1]
        off, b0 = start % bs, start // bs
        self.reserve(st, start + L)
        if L == 1:                                           # a decode step: fold one key in
            kf = k[:, 0].float()                                          # [H_kv, D]
            t, o = divmod(b0, TILE)
            st.kmin[:, t, :, o] = torch.minimum(st.kmin[:, t, :, o], kf)
            st.kmax[:, t, :, o] = torch.maximum(st.kmax[:, t, :, o], kf)
            return
        nb = -(-(off + L) // bs)
        pad = (0, 0, off, nb * bs - off - L)
        kf = k.float()                                                    # [H_kv, L, D]
        lo = F.pad(kf, pad, value=float("inf")).view(self.H_kv, nb, bs, self.D).amin(2)    # [H_kv, nb, D]
        hi = F.pad(kf, pad, value=float("-inf")).view(self.H_kv, nb, bs, self.D).amax(2)
        tiled_write(st.kmin, b0, torch.minimum(tiled_read(st.kmin, b0, b0 + nb), lo.transpose(1, 2)))
        tiled_write(st.kmax, b0, torch.maximum(tiled_read(st.kmax, b0, b0 + nb), hi.transpose(1, 2)))

    def score(self, st: Bounds, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        # max(q_d kmax_d, q_d kmin_d) is q_d kmax_d where q_d >= 0, else q_d kmin_d: two matmuls
        pos, neg = q.clamp(min=0), q.clamp(max=0)                         # [H_kv, G, D]
        bound = tiled_matmul(pos, st.kmax, lo, hi) + tiled_matmul(neg, st.kmin, lo, hi)   # [H_kv, G, n]
        return group_max(bound)
