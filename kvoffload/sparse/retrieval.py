"""TriForce's retrieval cache (Sun et al., arXiv 2404.11912) as a selection policy.

Keys are grouped in chunks of 8 tokens (``--sparse-chunk``); a chunk's score is the plain
dot product of the query with the mean of its post-RoPE keys (no softmax, no scaling), per
query head, max over the GQA group; the first chunk (the attention sink) is always kept and
the top chunks fill the budget. TriForce selects once, with the last prefill token's query,
and gathers the chosen K/V into the draft's cache; that is how ``--speculate self`` uses it
(``kvoffload/speculative/``). Registered as a policy it also serves plain sparse decode, selecting
every step.

Departures: the sink is rounded up to one whole block (16 tokens: chunks 0 and 1, where
TriForce keeps chunk 0), and the last 128 tokens are always kept (``--sparse-recent-tokens``;
TriForce keeps none at selection and appends the tokens generated after it). Measured as a
draft (``benchmarks/speculation``): without the window a batch of 4 sequences of repetitive
text at 4K accepted 29% of the drafted tokens, with it 93%; the chunks scored by one query
need not include the text just before it. TriForce's models are
MHA; for GQA we take the max over the group, as ShadowKV does.
"""

from __future__ import annotations

import torch

from kvoffload.sparse.base import group_max, tiled_matmul
from kvoffload.sparse.shadowkv import Landmarks, ShadowKV


class Retrieval(ShadowKV):
    name = "retrieval"
    sink_tokens = 8                          # chunk 0
    recent_tokens = 128                      # TriForce: 0 (see the module docstring)

    def score(self, st: Landmarks, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        per = self.bs // self.unit
        return group_max(tiled_matmul(q, st.land, lo * per, hi * per))   # [H_kv, chunks]
