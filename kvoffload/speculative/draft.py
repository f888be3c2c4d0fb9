"""The draft's KV cache: per sequence, the tokens a sparse policy chose from the full KV at the
last rebuild, followed by every token verified since; it lives in the compute device's memory.

Its store is a :class:`~kvoffload.attention.dense.DenseBackend` whose positions are *cache
slots*: the draft's forward passes carry the tokens' true positions (RoPE) and, as ``starts``,
how many tokens the draft cache holds (where the new token's k/v go). A draft token is written
past the verified ones; the next commit writes the target's exact k/v of the accepted tokens
over it (the draft's own approximate k/v of them are discarded: that is its rollback).

A rebuild scores the full KV with one query per layer (the newest committed token's, as
TriForce uses the last prefill token's), asks the policy for ``SpecConfig.draft_budget(T)``
tokens per (layer, KV head), and reads those tokens' K/V from the target's store
(``gather``: from whatever tier holds them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvoffload.attention.backend import KVManager
from kvoffload.attention.dense import DenseBackend
from kvoffload.config import ModelConfig, SpecConfig
from kvoffload.sparse.base import SparsePolicy


@dataclass
class DraftSeq:
    n: int = 0             # tokens in the draft cache
    base: int = 0          # of which chosen at the last rebuild
    length: int = 0        # tokens of the full sequence (the next token's position)
    capacity: int = 0      # slots allocated in the store
    limit: int = 0         # tokens the sequence may reach (prompt + max new tokens)


class DraftCache:
    def __init__(self, model: ModelConfig, spec: SpecConfig, policy: SparsePolicy, device: torch.device,
                 kv_dtype: torch.dtype, act_dtype: torch.dtype, block_size: int) -> None:
        self.model, self.spec, self.policy, self.bs = model, spec, policy, block_size
        self.store = DenseBackend(model, device, kv_dtype, act_dtype, block_size=block_size)
        self.seqs: dict[int, DraftSeq] = {}
        self.peak_bytes = 0                      # most the draft caches held at once

    def allocate(self, seq_id: int, capacity: int) -> None:
        self.policy.allocate(seq_id, capacity)
        self.seqs[seq_id] = DraftSeq(limit=capacity)

    def free(self, seq_id: int) -> None:
        self.policy.free(seq_id)
        self.store.free(seq_id)
        self.seqs.pop(seq_id, None)

    def full(self, seq_id: int) -> bool:
        """Whether the next round might not fit (its drafts, then its verified tokens): the
        window is used up, unless the sequence ends first."""
        s = self.seqs[seq_id]
        need = min(self.spec.num_speculative_tokens + 1, s.limit - s.length)
        return s.capacity - s.n - (self.spec.num_speculative_tokens + 1) < need

    def rebuild(self, seq_id: int, length: int, q: list[torch.Tensor], source: KVManager) -> int:
        """Choose the draft cache from the ``length`` committed tokens; q: per layer the ``[H, D]``
        query that scores them. Returns the tokens chosen per (layer, KV head)."""
        budget = self.spec.draft_budget(length)
        chosen = [self._chosen(layer, seq_id, q[layer], length, budget) for layer in range(self.model.num_layers)]
        n = min(c.shape[-1] for c in chosen)
        index = torch.stack([c[:, c.shape[-1] - n:] for c in chosen])             # [layers, H_kv, n]
        k, v = source.gather(seq_id, index)                                       # [layers, H_kv, n, D]
        s = self.seqs[seq_id]            # room for the window, or for the rest of the sequence if less
        cap = n + min(self.spec.spec_draft_window, s.limit - length) + self.spec.num_speculative_tokens + 1
        if cap > s.capacity:
            self.store.allocate(seq_id, cap)
            s.capacity = cap
            self.peak_bytes = max(self.peak_bytes, self.bytes_held())
        self.store.write(seq_id, 0, k, v)
        s.n = s.base = n
        s.length = length
        return n

    def _chosen(self, layer: int, seq_id: int, q: torch.Tensor, length: int, budget: int) -> torch.Tensor:
        """``[H_kv, n]`` token positions the policy picks for this layer (the same count for
        every head and layer: if a policy gave them different counts, each keeps its newest n;
        the draft may be anything, only its acceptance rate depends on it)."""
        sel = self.policy.select(layer, seq_id, q, length, budget)
        idx, valid = sel.token_index(length, self.bs)                             # [H_kv, T]
        n = int(valid.sum(1).min())
        return torch.stack([row[ok][-n:] if n else row[:0] for row, ok in zip(idx, valid)])

    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K, V ``[layers, H_kv, m, D]``: the target's exact k/v of m verified tokens."""
        s = self.seqs[seq_id]
        self.store.write(seq_id, s.n, k, v)
        s.n += k.shape[2]
        s.length += k.shape[2]

    def slot(self, seq_id: int) -> int:
        """Where the draft's next token goes (the first after the verified ones)."""
        return self.seqs[seq_id].n

    def bytes_held(self) -> int:
        """Bytes of the draft caches' buffers (all sequences), in the compute device's memory."""
        return self.store.bytes_held()

