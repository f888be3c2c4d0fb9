"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus a recent window.

Defaults: 4 sink tokens (``start_size=4`` in the authors' ``run_streaming_llama.py``); the
recent window is whatever the budget leaves (they use 2000 or 512 tokens). Every layer is
sparse. Unlike the paper we do not re-assign positions inside the cache (``pos_shift``): the
full KV is kept and stays addressable, so the window reads true positions. No metadata.
"""

from __future__ import annotations

import torch

from kvoffload.sparse.base import SparsePolicy


class Streaming(SparsePolicy):
    name = "streaming"
    sink_tokens = 4

    def score(self, state, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        # the newest blocks first: the window grows back from the tail
        return torch.arange(lo, hi, dtype=torch.float32).expand(self.H_kv, hi - lo)
