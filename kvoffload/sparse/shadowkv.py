"""ShadowKV's selection (Sun et al., arXiv 2410.21465): chunk landmarks, outlier chunks and a
local window.

Keys are grouped in chunks of 8 tokens (``--sparse-chunk``). Metadata per chunk and KV head:
its landmark, the mean of its post-RoPE keys, and the minimum cosine similarity of its keys to
that landmark. Each decode step scores the landmarks with ``softmax(q . landmark / sqrt(D))``
per query head (max over the GQA group, as ShadowKV); the chunks whose keys stray furthest
from their landmark (lowest minimum cosine: the "outliers") are always kept; the top chunks
fill the rest of the budget. Defaults from the authors' code: chunk 8, a local window of 4
chunks (32 tokens) plus the partial tail, outliers 48 chunks per 2048 budget tokens (the
same share of any budget), every layer sparse, no sinks.

Departure: ShadowKV stores the keys as a low-rank SVD of the pre-RoPE keys (rank 160 for
Llama-3-8B) and rebuilds the chosen chunks' keys on the fly, reading only their values from
the offload tier. Our KV store keeps exact keys (the dense path and the other policies need
them), so the chosen chunks are attended with their exact keys and a chosen chunk's block is
read whole (K and V): the selection is ShadowKV's. The key compression is the ``shadowkv_lowrank`` policy
(:mod:`kvoffload.sparse.shadowkv_lowrank`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kvoffload.sparse.base import (
    SparsePolicy,
    group_max,
    tiled,
    tiled_columns,
    tiled_grow,
    tiled_matmul,
    tiled_write,
)


@dataclass
class Landmarks:
    land: torch.Tensor           # [H_kv, tiles, D, TILE] mean key of each complete chunk (fp32, tiled channel-major)
    mincos: torch.Tensor         # [H_kv, tiles * TILE] min cosine of its keys to that mean
    pending: torch.Tensor        # [H_kv, chunk, D] keys of the incomplete chunk (the first p rows)
    hdr: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))   # [complete chunks n, pending p]

    @property
    def n(self) -> int:
        return int(self.hdr[0])

    @property
    def p(self) -> int:
        return int(self.hdr[1])


class ShadowKV(SparsePolicy):
    name = "shadowkv"
    recent_tokens = 32                       # local_chunk = 4 chunks of 8
    outlier_share = 48 * 8 / 2048            # outlier tokens per budget token (48 chunks at 2048)

    @property
    def unit(self) -> int:
        return self.cfg.sparse_chunk

    def new_state(self, layer: int, capacity: int) -> Landmarks:
        land = tiled(self.H_kv, self.D, -(-max(capacity, 1) // self.unit), 0.0, self.device)
        return Landmarks(land, torch.zeros(self.H_kv, tiled_columns(land), device=self.device),
                         torch.zeros(self.H_kv, self.unit, self.D, device=self.device))

    def capacity(self, st: Landmarks) -> int:
        return tiled_columns(st.land) * self.unit

    def grow(self, st: Landmarks, tokens: int) -> None:
        st.land = tiled_grow(st.land, -(-tokens // self.unit), 0.0)
        st.mincos = F.pad(st.mincos, (0, tiled_columns(st.land) - st.mincos.shape[1]))

    def native_row(self, st: Landmarks) -> tuple[int, ...]:
        return (st.land.data_ptr(), st.mincos.data_ptr(), st.pending.data_ptr(), st.hdr.ctypes.data,
                tiled_columns(st.land))

    def native_args(self) -> dict:
        return {"outlier_share": self.outlier_share}

    def update(self, st: Landmarks, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        c, n = self.unit, st.n
        keys = torch.cat([st.pending[:, :st.p], k.float()], dim=1)       # [H_kv, p + L, D]
        m = keys.shape[1] // c
        rest = keys[:, m * c:]                                            # [H_kv, < c, D]
        if m:
            self.reserve(st, (n + m) * c)
            chunks = keys[:, :m * c].reshape(self.H_kv, m, c, self.D)
            mean = chunks.mean(2)                                         # [H_kv, m, D]
            cos = F.cosine_similarity(chunks, mean[:, :, None], dim=-1)   # [H_kv, m, c]
            tiled_write(st.land, n, mean.transpose(1, 2))
            st.mincos[:, n:n + m] = cos.amin(-1)
        st.pending[:, :rest.shape[1]] = rest
        st.hdr[0], st.hdr[1] = n + m, rest.shape[1]

    def score(self, st: Landmarks, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        per = self.bs // self.unit
        a, b = lo * per, hi * per                                         # candidate chunks
        s = torch.softmax(tiled_matmul(q, st.land, a, b) / self.D ** 0.5, dim=-1)
        score = group_max(s)                                              # [H_kv, n] in [0, 1]
        out = self.outliers(st, a, b, length)
        if out.shape[1]:
            score.scatter_(1, out, 2.0)                                   # above any probability
        return score

    def outliers(self, st: Landmarks, a: int, b: int, length: int) -> torch.Tensor:
        """``[H_kv, n_out]`` the outlier chunks among candidate chunks ``a .. b-1`` (relative to
        ``a``): the lowest min-cosines, ties toward the lower chunk (as the native kernel:
        repeated chunks have equal landmarks)."""
        n_out = min(b - a, round(self.outlier_share * self.cfg.budget_tokens(length) / self.unit))
        return st.mincos[:, a:b].sort(dim=-1, stable=True).indices[:, :max(0, n_out)]
