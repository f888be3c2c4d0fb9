"""In-memory dense attention backend: each sequence owns contiguous K/V buffers.

The reference every other placement and policy is compared against. Buffers are
sized at :meth:`DenseBackend.allocate` (prompt + max new tokens), so decode never
reallocates; the engine says where each forward writes (``ForwardBatch.starts``),
so no layer keeps a running length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvoffload.attention.native import NativeDecode
from kvoffload.attention.ops import (
    causal_mask,
    decode_attention,
    gathered_attention,
    needs_mask,
    prefill_attention,
)
from kvoffload.config import ModelConfig
from kvoffload.errors import ConfigError, InputError
from kvoffload.model.interface import ForwardBatch
from kvoffload.sparse.base import SparseCounters, SparsePolicy


@dataclass
class SeqKV:
    k: torch.Tensor   # [layers, H_kv, capacity, D]
    v: torch.Tensor   # [layers, H_kv, capacity, D]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


class DenseBackend:
    """All KV in one memory (the compute device's), attention computed there.

    Decode uses the native CPU kernel when it is available (``native=True``, fp32/bf16 KV
    on the CPU), else the PyTorch path in :mod:`kvoffload.attention.ops`; both are tested
    against each other.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device, kv_dtype: torch.dtype,
                 act_dtype: torch.dtype | None = None, native: bool = True,
                 policy: SparsePolicy | None = None, block_size: int = 16) -> None:
        self.cfg, self.device, self.kv_dtype = cfg, device, kv_dtype
        self.seqs: dict[int, SeqKV] = {}
        G = cfg.num_heads // cfg.num_kv_heads
        self.native = NativeDecode.create(kv_dtype, device, cfg.num_kv_heads, G, cfg.head_dim,
                                          act_dtype or kv_dtype) if native else None
        self._dense_decode = self._decode_torch if self.native is None else self._decode_native
        # sparse decode: the policy picks blocks of ``block_size`` tokens (the tiered store's
        # blocks; here they are ranges of the contiguous buffers)
        self.policy, self.bs = policy, block_size
        self.sparse_stats = SparseCounters()
        self.decode = self._dense_decode if policy is None else self._decode_policy
        self._memo: tuple[ForwardBatch, tuple[np.ndarray, ...]] | None = None
        self._mask_memo: tuple[ForwardBatch, int, torch.Tensor] | None = None
        self._staged: dict[int, tuple[int, int]] = {}          # seq -> (start, L) of its last verify pass

    # ---- sequence lifecycle (called by the engine) ----
    def allocate(self, seq_id: int, capacity: int) -> None:
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, capacity, self.cfg.head_dim)
        self.seqs[seq_id] = SeqKV(torch.empty(shape, dtype=self.kv_dtype, device=self.device),
                                  torch.empty(shape, dtype=self.kv_dtype, device=self.device))
        if self.policy is not None:
            self.policy.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)
        self._staged.pop(seq_id, None)
        if self.policy is not None:
            self.policy.free(seq_id)

    def _check(self, kv: SeqKV, end: int) -> None:
        if end > kv.capacity:
            raise InputError(f"sequence needs {end} KV slots but {kv.capacity} were allocated")

    # ---- the AttentionBackend protocol ----
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        o = self._chunk(layer, q, k, v, batch)
        if self.policy is not None:
            for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
                self.policy.append(layer, sid, start, k[b], v[b])
        return o

    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """Like a prefill chunk per sequence; the k/v written past the committed tokens are
        dead until :meth:`commit` says how many of them stay (the next pass overwrites the rest)."""
        o = self._chunk(layer, q, k, v, batch)
        if layer == 0:
            for sid, start in zip(batch.seq_ids, batch.starts):
                self._staged[sid] = (start, batch.num_tokens)
        return o

    def _chunk(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """Write k/v at ``starts`` and attend each sequence's L tokens causally: ``[B, L, H, D]``."""
        L = batch.num_tokens
        outs = []
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            kv = self.seqs[sid]
            self._check(kv, start + L)
            kc, vc = kv.k[layer], kv.v[layer]                          # [H_kv, cap, D]
            kc[:, start:start + L] = k[b]
            vc[:, start:start + L] = v[b]
            mask = self._mask(batch, b, q.dtype) if needs_mask(start, self.device) else None
            outs.append(prefill_attention(q[b], kc[:, :start + L], vc[:, :start + L], start, mask))
        return torch.stack(outs)                                       # [B, L, H, D]

    # ---- speculation: commit / rollback, reading KV back ----
    def commit(self, seq_id: int, n: int) -> None:
        """Keep the first ``n`` tokens of the last verify pass; the others are rolled back (their
        slots are past the sequence's length: the next pass writes over them)."""
        start, L = self._staged.pop(seq_id)
        if not 0 <= n <= L:
            raise ValueError(f"commit of {n} tokens from a verify pass of {L}")
        if self.policy is not None and n:
            kv = self.seqs[seq_id]
            for layer in range(self.cfg.num_layers):
                self.policy.append(layer, seq_id, start, kv.k[layer, :, start:start + n], kv.v[layer, :, start:start + n])

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens (later slots are dead: the
        next pass writes over them)."""
        if self.policy is not None:
            raise ConfigError("truncating a sequence is not supported with a sparse policy (its metadata is append-only)")
        self._staged.pop(seq_id, None)
        self._check(self.seqs[seq_id], length)

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``."""
        kv = self.seqs[seq_id]
        idx = index.to(self.device)[..., None].expand(-1, -1, -1, self.cfg.head_dim)
        return kv.k.gather(2, idx), kv.v.gather(2, idx)

    def write(self, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V ``[layers, H_kv, n, D]`` as the sequence's tokens ``start .. start+n-1``
        (a draft cache filled from another store)."""
        kv = self.seqs[seq_id]
        n = k.shape[2]
        self._check(kv, start + n)
        kv.k[:, :, start:start + n] = k
        kv.v[:, :, start:start + n] = v

    def _mask(self, batch: ForwardBatch, b: int, dtype: torch.dtype) -> torch.Tensor:
        """The chunk's causal mask, built by the first layer and reused by the others."""
        memo = self._mask_memo
        if memo is None or memo[0] is not batch or memo[1] != b:
            self._mask_memo = memo = (batch, b, causal_mask(batch.num_tokens, batch.starts[b], dtype, self.device))
        return memo[2]

    def _decode_native(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       batch: ForwardBatch) -> torch.Tensor:
        if self._memo is None or self._memo[0] is not batch:      # once per forward, not per layer
            seqs = [self.seqs[sid] for sid in batch.seq_ids]
            for kv, pos in zip(seqs, batch.starts):
                self._check(kv, pos + 1)
            arrays = (np.array([s.k.data_ptr() for s in seqs], dtype=np.int64),
                      np.array([s.v.data_ptr() for s in seqs], dtype=np.int64),
                      np.array([s.capacity for s in seqs], dtype=np.int64),
                      np.array(batch.starts, dtype=np.int64) + 1)
            self._memo = (batch, arrays)
        out, _ = self.native(layer, q[:, :, 0], k[:, :, 0], v[:, :, 0], *self._memo[1])   # [B, H, D]
        return out.unsqueeze(1)                                                             # [B, 1, H, D]

    def _decode_torch(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      batch: ForwardBatch) -> torch.Tensor:
        outs = []
        for b, (sid, pos) in enumerate(zip(batch.seq_ids, batch.starts)):
            kv = self.seqs[sid]
            kc, vc = kv.k[layer], kv.v[layer]                          # [H_kv, cap, D]
            kc[:, pos] = k[b, :, 0]
            vc[:, pos] = v[b, :, 0]
            outs.append(decode_attention(q[b, :, 0], kc[:, :pos + 1], vc[:, :pos + 1]))
        return torch.stack(outs).unsqueeze(1)                          # [B, 1, H, D]

    def _decode_policy(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       batch: ForwardBatch) -> torch.Tensor:
        if not self.policy.sparse(layer):
            return self._dense_decode(layer, q, k, v, batch)
        outs = []
        for b, (sid, pos) in enumerate(zip(batch.seq_ids, batch.starts)):
            kv = self.seqs[sid]
            self._check(kv, pos + 1)
            kc, vc = kv.k[layer], kv.v[layer]                          # [H_kv, cap, D]
            kc[:, pos] = k[b, :, 0]
            vc[:, pos] = v[b, :, 0]
            self.policy.append(layer, sid, pos, k[b], v[b])
            sel = self.policy.select(layer, sid, q[b, :, 0], pos + 1)
            idx, valid = sel.token_index(pos + 1, self.bs)             # [H_kv, n]
            o = sel.corrected(gathered_attention(q[b, :, 0], kc, vc, idx.to(self.device), valid.to(self.device)))
            self.sparse_stats.add(sel, pos + 1, self.bs, 2 * self.cfg.head_dim * kc.element_size())
            outs.append(o.to(q.dtype))
        return torch.stack(outs).unsqueeze(1)                          # [B, 1, H, D]
