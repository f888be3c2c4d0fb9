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
read whole (K and V): the selection is ShadowKV's, the key compression is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvoffload.sparse.base import SparsePolicy, group_max


@dataclass
class Landmarks:
    land: torch.Tensor           # [H_kv, chunks, D] mean key of each complete chunk (fp32)
    mincos: torch.Tensor         # [H_kv, chunks] min cosine of its keys to that mean
    pending: torch.Tensor        # [H_kv, p, D] keys of the incomplete chunk (p < chunk)
    n: int = 0                   # complete chunks


class ShadowKV(SparsePolicy):
    name = "shadowkv"
    recent_tokens = 32                       # local_chunk = 4 chunks of 8
    outlier_share = 48 * 8 / 2048            # outlier tokens per budget token (48 chunks at 2048)

    @property
    def unit(self) -> int:
        return self.cfg.sparse_chunk

    def new_state(self, layer: int, capacity: int) -> Landmarks:
        n = max(1, capacity // self.unit)
        return Landmarks(torch.zeros(self.H_kv, n, self.D, device=self.device),
                         torch.zeros(self.H_kv, n, device=self.device),
                         torch.zeros(self.H_kv, 0, self.D, device=self.device))

    def update(self, st: Landmarks, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        c = self.unit
        keys = torch.cat([st.pending, k.float()], dim=1)                 # [H_kv, p + L, D]
        m = keys.shape[1] // c
        st.pending = keys[:, m * c:].clone()
        if not m:
            return
        if st.n + m > st.land.shape[1]:
            extra = st.n + m - st.land.shape[1]
            st.land = F.pad(st.land, (0, 0, 0, extra))
            st.mincos = F.pad(st.mincos, (0, extra))
        chunks = keys[:, :m * c].reshape(self.H_kv, m, c, self.D)
        mean = chunks.mean(2)                                             # [H_kv, m, D]
        cos = F.cosine_similarity(chunks, mean[:, :, None], dim=-1)       # [H_kv, m, c]
        st.land[:, st.n:st.n + m] = mean
        st.mincos[:, st.n:st.n + m] = cos.amin(-1)
        st.n += m

    def score(self, st: Landmarks, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        per = self.bs // self.unit
        a, b = lo * per, hi * per                                         # candidate chunks
        s = torch.softmax(torch.matmul(q, st.land[:, a:b].transpose(1, 2)) / self.D ** 0.5, dim=-1)
        score = group_max(s)                                              # [H_kv, n] in [0, 1]
        n_out = min(b - a, round(self.outlier_share * self.cfg.budget_tokens(length) / self.unit))
        if n_out:
            out = st.mincos[:, a:b].topk(n_out, dim=-1, largest=False).indices
            score.scatter_(1, out, 2.0)                                   # above any probability
        return score
