"""In-memory backend: each sequence's KV is one contiguous run of slots per layer, in the
compute device's memory.

The fastest store when everything fits, and the reference the tiered store is held to. Its
slots have the tiered store's layout (kv/layout.py), and decode runs the same paged kernel over
the same fixed chunks plus the tail block, merged in the same order — so a sequence decodes to
bit-identical outputs here and with its KV spread over tiers. On the CPU a decode layer is one
native call (append the new token, attend every chunk, merge); elsewhere (CUDA, no compiler)
the PyTorch reference computes the same items.

Buffers are sized at :meth:`DenseBackend.allocate` (prompt + max new tokens), so decode never
reallocates; the engine says where each forward writes (``ForwardBatch.starts``).
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload import hugepages
from kvoffload.attention.backend import KVStats, sparse_line
from kvoffload.attention.merge import OWN_KEY, TAIL_KEY, Parts
from kvoffload.attention.ops import attend_lse, own_attention, prefix_attention
from kvoffload.config import ModelConfig
from kvoffload.dtypes import name_of
from kvoffload.errors import ConfigError, InputError
from kvoffload.kernels.hook import AttnHook, KVConvert
from kvoffload.kernels.paged import Append, Items, Merge, PagedAttention, PreparedCall
from kvoffload.kernels.select import NativeSelect, SparseStep
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.memory import attend_slots
from kvoffload.model.interface import ForwardBatch, Logits
from kvoffload.sparse.base import Selection, SparseCounters, SparsePolicy, mean_mix


class DecodeItems:
    """The items of a batch's decode step over contiguous slots: per sequence its chunks (of
    the full blocks before the tail) then its tail block. ``block`` ``[M]``: slot index (block
    number) of every item block; ``seq`` ``[M]``: its sequence's batch row; masks ``[M, H_kv]``
    (sparse) or None; ``keys`` ``[N]``: merge keys."""

    def __init__(self, layout: BlockLayout, starts: tuple[int, ...], chosen: list[Selection] | None) -> None:
        bs = layout.block_size
        rows, firsts, lasts, blocks, keys, masks = [], [np.zeros(1, np.int64)], [], [], [], []
        full = np.uint64((1 << bs) - 1) if bs < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        tail_mask = np.full((1, layout.num_kv_heads), full, np.uint64)
        n = 0                                                                # blocks so far
        for b, s in enumerate(starts):
            n_full = s // bs
            if chosen is None:
                blk, msk = np.arange(n_full, dtype=np.int64), None
            else:
                blk, msk = chosen[b].union(bs)
                masks += [msk, tail_mask]
            first, chunk = layout.chunk_runs(blk)                            # one item per chunk run
            blocks += [blk, np.array([n_full], np.int64)]                    # then the tail block
            firsts += [n + first[1:], np.array([n + len(blk) + 1], np.int64)]
            n += len(blk) + 1
            rows.append(np.full(len(chunk) + 1, b, np.int64))
            lasts.append(np.full(len(chunk) + 1, bs, np.int64))
            lasts[-1][-1] = s % bs + 1
            keys += [chunk, np.array([TAIL_KEY], np.int64)]
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        firsts = np.concatenate(firsts)
        lasts = np.concatenate(lasts) if lasts else np.zeros(0, np.int64)
        self.row = np.asarray(rows, np.int64)
        self.first = np.asarray(firsts, np.int64)
        self.last = np.asarray(lasts, np.int64)
        self.block = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
        self.seq = np.repeat(self.row, np.diff(self.first))
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        self.masks = np.concatenate(masks) if masks else None
        self.row_first = np.searchsorted(self.row, np.arange(len(starts) + 1)).astype(np.int64)


class _DensePlan:
    """A dense decode step's prepared kernel call per layer: the items of every sequence (its
    chunks and its tail block) over its slots, the append into its tail block, the merge. Valid
    while each sequence's tail stays in one block; :meth:`update` moves the tail's token count."""

    def __init__(self, be: DenseBackend, batch: ForwardBatch, bases: np.ndarray) -> None:
        """bases ``[layers, B]``: each sequence's slot 0 at every layer (:meth:`DenseBackend._layer_bases`)."""
        lay, sb = be.layout, be.layout.slot_bytes
        self.bs = lay.block_size
        items = DecodeItems(lay, batch.starts, None)
        self.last = items.last                                               # updated in place
        self.tail = np.nonzero(items.keys == TAIL_KEY)[0]
        self.cols = np.zeros(len(batch.seq_ids), np.int64)
        tails = np.array([s // lay.block_size for s in batch.starts], np.int64)
        self.calls = []
        for base in bases:                                                   # [B] each layer's slot 0
            self.calls.append(PreparedCall(be.kernel, Items(items.row, items.first, self.last,
                                                            base[items.seq] + items.block * sb),
                                           be.threads, base + tails * sb, self.cols, items.row_first))

    def update(self, starts: tuple[int, ...]) -> None:
        """The step's token columns (the new token's place in its tail block)."""
        self.cols[:] = np.asarray(starts, np.int64) % self.bs
        self.last[self.tail] = self.cols + 1


class DenseBackend:
    """All KV in one memory (the compute device's), attention computed there."""

    def __init__(self, cfg: ModelConfig, device: torch.device, kv_dtype: torch.dtype,
                 act_dtype: torch.dtype | None = None, native: bool = True,
                 policy: SparsePolicy | None = None, block_size: int = 16, chunk_blocks: int = 16,
                 threads: int | None = None) -> None:
        self.cfg, self.device, self.kv_dtype = cfg, device, kv_dtype
        self.layout = lay = BlockLayout(block_size, cfg.num_kv_heads, cfg.head_dim, name_of(kv_dtype), chunk_blocks)
        # (full precision only: a compressed KV is the tiered store's, attention/__init__.py)
        self.H, self.G = cfg.num_heads, cfg.num_heads // cfg.num_kv_heads
        self.threads = threads or torch.get_num_threads()
        usable = native and device.type == "cpu" and PagedAttention.available(lay.dtype, self.G, lay.head_dim, block_size)
        self.kernel = PagedAttention(lay.dtype, lay.num_kv_heads, self.G, lay.head_dim, block_size) if usable else None
        self.seqs: dict[int, torch.Tensor] = {}                # seq -> [layers, blocks, slot_elems]
        self.policy, self.bs = policy, block_size
        self._sparse_stats = SparseCounters()
        self._pending: tuple | None = None   # a hooked sparse step's (starts, B), counted at the next entry
        self._memo: tuple[ForwardBatch, _DensePlan] | None = None
        self._base_memo: tuple[ForwardBatch, np.ndarray] | None = None
        self._step: SparseStep | None = None                   # a sparse layer's one native call
        self.one_call = True           # False: a native sparse layer goes through DecodeItems (tests compare)
        self.native_hook = True        # False: fused layers call decode() (tests compare)
        self._convert = KVConvert(name_of(kv_dtype), cfg.num_kv_heads * cfg.head_dim)   # k/v of another dtype, for hooks
        self._plans: dict[tuple, _DensePlan] = {}
        self._staged: dict[int, tuple[int, list]] = {}         # seq -> (start, per layer (k, v)) of its last verify
        self.decode_tokens = 0

    # ---- sequence lifecycle ----
    def allocate(self, seq_id: int, capacity: int) -> None:
        nb = -(-max(capacity, 1) // self.bs)
        # on the CPU: lazily-touched huge pages (the decode kernels stream these blocks)
        self.seqs[seq_id] = hugepages.zeros((self.cfg.num_layers, nb, self.layout.slot_elems), self.kv_dtype,
                                            self.device)
        if self.policy is not None:
            self.policy.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)
        self._staged.pop(seq_id, None)
        if self.policy is not None:
            self.policy.free(seq_id)

    def _slots(self, seq_id: int, end: int) -> torch.Tensor:
        """``[layers, blocks, slot_elems]`` of a sequence that must hold ``end`` tokens."""
        slots = self.seqs[seq_id]
        if end > slots.shape[1] * self.bs:
            raise InputError(f"sequence needs {end} KV slots but {slots.shape[1] * self.bs} were allocated")
        return slots

    def share(self, seq_id: int, source: DenseBackend, length: int) -> None:
        """Decode sequence ``seq_id`` over ``source``'s KV of it (the same slots: what this
        backend writes, ``source`` sees); a policy's metadata is built from its first ``length``
        tokens. (Several configurations decoding from one shared prefill: ``kvoffload sweep``.)"""
        self.seqs[seq_id] = slots = source.seqs[seq_id]
        if self.policy is not None:
            self.policy.allocate(seq_id, slots.shape[1] * self.bs)
            for layer in range(self.cfg.num_layers):
                self.policy.append(layer, seq_id, 0, *self.layout.unpack(slots[layer, :-(-length // self.bs)], length))

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.seqs.values())

    # ---- the AttentionBackend protocol ----
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``."""
        self._count_pending()
        outs = []
        L = batch.num_tokens
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            slots = self._slots(sid, start + L)[layer]
            kb, vb = k[b].to(self.kv_dtype), v[b].to(self.kv_dtype)             # as stored: [H_kv, L, D]
            if start == 0:
                outs.append(own_attention(q[b], kb, vb))
            else:
                k_pre, v_pre = self.layout.unpack(slots[:-(-start // self.bs)], start)
                outs.append(prefix_attention(q[b], k_pre, v_pre, kb, vb))
            self.layout.write_range(slots, start, kb, vb)
            if self.policy is not None:
                self.policy.append(layer, sid, start, kb, vb)
                if batch.logits is Logits.LAST:                  # the prompt is complete
                    self.policy.prefilled(layer, sid, start + kb.shape[1])
        return torch.stack(outs)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, 1, D]``, k/v ``[B, H_kv, 1, D]`` -> ``[B, 1, H, D]``."""
        self._count_pending()
        kvd = self.kv_dtype
        k_new, v_new = k[:, :, 0].to(kvd), v[:, :, 0].to(kvd)                   # [B, H_kv, D]
        chosen = rebuilt = None
        if self.policy is not None and self.policy.sparse(layer):
            one = self.kernel and self.one_call and not self.policy.rebuilds_keys
            sel = self.policy.native_kernel(q[:, :, 0], k_new, v_new) if one else None
            if sel is not None:
                o = self._sparse_step(sel, layer, q[:, :, 0], k_new, v_new, batch)
                if layer == self.cfg.num_layers - 1:
                    self.decode_tokens += len(batch.seq_ids)
                return o.unsqueeze(1).to(q.dtype)
            chosen = self.policy.select_batch(layer, batch.seq_ids, q[:, :, 0], batch.starts, k_new, v_new)
            if self.policy.rebuilds_keys:
                chosen, rebuilt = self.policy.split_rebuilt(layer, batch.seq_ids, batch.starts, chosen)
            items, base = DecodeItems(self.layout, batch.starts, chosen), self._layer_bases(batch)[layer]
        else:
            items = base = None
        q_rows = q[:, :, 0].float()                                                  # [B, H, D]
        o, lse = self._attend(layer, q_rows, k_new, v_new, batch, items, base)       # [B, H, D], [B, H]
        if rebuilt is not None:
            o = self.policy.attend_rebuilt(rebuilt, q_rows, o, lse, lambda b, blocks: self.layout.unpack_blocks(
                self.seqs[batch.seq_ids[b]][layer, torch.from_numpy(blocks).to(self.device)])[1])
        if chosen is not None:
            o = self._sparse_stats.finish(chosen, o, batch.starts, self.bs, self.layout.token_bytes(1) // self.cfg.num_kv_heads)
        if layer == self.cfg.num_layers - 1:
            self.decode_tokens += len(batch.seq_ids)
        return o.unsqueeze(1).to(q.dtype)

    @property
    def sparse_stats(self) -> SparseCounters:
        self._count_pending()
        return self._sparse_stats

    def _count_pending(self) -> None:
        """Count the last hooked sparse step (its info is overwritten by the next step)."""
        if self._pending is not None:
            starts, B = self._pending
            self._pending = None
            self._count_native(starts, self._step.info(B))

    def _count_native(self, starts: tuple[int, ...], info: np.ndarray) -> None:
        """A native sparse step's per-sequence counts into the sparse counters."""
        H_kv = self.cfg.num_kv_heads
        self._sparse_stats.add_native(starts, info, H_kv, self.bs, self.layout.token_bytes(1) // H_kv)

    def _step_args(self, sel: NativeSelect, layer: int, batch: ForwardBatch) -> tuple[int, int, np.ndarray]:
        """The one-call sparse step for ``sel`` (reused while it runs ``sel``) and the layer's
        arguments to it: the policy's state table, its per-layer array, each sequence's slot 0."""
        pol = self.policy
        self._step = SparseStep.reuse(self._step, sel, self.kernel, self.layout, self.threads)
        return pol.native_table(layer, batch.seq_ids, batch.starts), pol.native_aux(layer), self._layer_bases(batch)[layer]

    def native_decode(self, layer: int, batch: ForwardBatch, dtype: torch.dtype) -> AttnHook | None:
        """A decode layer's attention as a native hook (a ``kvo_attn_hook``, kernels/kvo_hook.h,
        which keeps what it reads alive while held) for a fused layer to run in the same native call as its
        projections: a dense layer's prepared call, or a sparse layer's one-call step (selection
        included), appending the new tokens' k/v where :meth:`decode` would. None where
        :meth:`decode` must run (no kernel, a sparse policy without a native step or with an output
        correction). k/v of another ``dtype`` than the KV's are rounded to it in the hook
        (:class:`KVConvert`). The same bits as :meth:`decode`."""
        self._count_pending()
        if self.kernel is None or not self.native_hook:
            return None
        pol = self.policy
        if pol is not None and pol.sparse(layer):
            sel = pol.native_kernel_for(dtype, self.kv_dtype) if self.one_call and not pol.rebuilds_keys else None
            if sel is None:
                return None
            table, aux, base = self._step_args(sel, layer, batch)                 # (sets self._step)
            hook = self._step.hook(batch.starts, table, aux, base, self.kv_dtype)
            if hook is None:
                return None
            self._pending = (batch.starts, len(batch.seq_ids))
        else:
            hook = self._plan(batch).calls[layer].hook()
        if layer == self.cfg.num_layers - 1:
            self.decode_tokens += len(batch.seq_ids)
        return hook if dtype == self.kv_dtype else self._convert.wrap(hook, name_of(dtype), len(batch.seq_ids))

    def _sparse_step(self, sel: NativeSelect, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     batch: ForwardBatch) -> torch.Tensor:
        """A sparse decode layer in one native call (kernels/select.py's :class:`SparseStep`:
        select, the items :class:`DecodeItems` would cut, append, attend, merge): q ``[B, H, D]``
        (the model's dtype) -> ``[B, H, D]`` fp32, the same bits as the step through Python."""
        table, aux, base = self._step_args(sel, layer, batch)
        B, H, D = q.shape
        out, lse = torch.empty(B, H, D), torch.empty(B, H)
        info, alpha, vmean = self._step(batch.starts, q, k_new, v_new, table, aux, base, q.float(), out, lse)
        self._count_native(batch.starts, info)
        return out if alpha is None else mean_mix(out, alpha, vmean)

    def _layer_bases(self, batch: ForwardBatch) -> np.ndarray:
        """``[layers, B]``: the address of each sequence's slot 0 at every layer (per batch)."""
        if self._base_memo is not None and self._base_memo[0] is batch:
            return self._base_memo[1]
        nb = np.array([self.seqs[sid].shape[1] for sid in batch.seq_ids], np.int64)
        bases = self._bases(batch)[None] + np.arange(self.cfg.num_layers, dtype=np.int64)[:, None] * nb * self.layout.slot_bytes
        self._base_memo = (batch, np.ascontiguousarray(bases))
        return self._base_memo[1]

    def _bases(self, batch: ForwardBatch) -> np.ndarray:
        """Per sequence of the batch: the address of its layer-0 slot 0 (after checking room)."""
        return np.array([self._slots(sid, s + 1).data_ptr() for sid, s in zip(batch.seq_ids, batch.starts)],
                        np.int64)

    def _plan(self, batch: ForwardBatch) -> _DensePlan:
        """The prepared kernel calls of a dense decode step (kept while every sequence's tail
        stays in the same block: the steps within a block only move the tail's token count)."""
        if self._memo is not None and self._memo[0] is batch:
            return self._memo[1]
        bases = self._layer_bases(batch)
        key = (batch.seq_ids, tuple(s // self.bs for s in batch.starts), tuple(bases[0]))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:                  # (micro-batches alternate between a few)
                self._plans.clear()
            plan = self._plans[key] = _DensePlan(self, batch, bases)
        plan.update(batch.starts)
        self._memo = (batch, plan)
        return plan

    def _attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                batch: ForwardBatch, items: DecodeItems | None, base: np.ndarray | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each sequence's new token to its tail block, then attend its items and merge:
        q ``[B, H, D]`` fp32 -> o ``[B, H, D]``, lse ``[B, H]`` fp32. ``items`` None: the dense
        step's prepared calls; else (sparse) these items over the sequences' slots, ``base`` ``[B]``
        each one's slot 0 at this layer."""
        B, H, D = q.shape
        sb = self.layout.slot_bytes
        if self.kernel is not None:
            out, lse = torch.empty(B, H, D), torch.empty(B, H)
            if items is None:
                self._plan(batch).calls[layer](q, k_new, v_new, out, lse)
                return out, lse
            tails = np.array([s // self.bs for s in batch.starts], np.int64)
            cols = np.array([s % self.bs for s in batch.starts], np.int64)
            part_o, part_lse = np.empty((len(items.row), H, D), np.float32), np.empty((len(items.row), H), np.float32)
            self.kernel(q, Items(items.row, items.first, items.last, base[items.seq] + items.block * sb,
                                 items.masks), part_o, part_lse, self.threads,
                        append=Append(k_new, v_new, base + tails * sb, cols),
                        merge=Merge(items.row_first, None, out, lse))
            return out, lse
        if items is None:
            items = DecodeItems(self.layout, batch.starts, None)
        for b, (sid, s) in enumerate(zip(batch.seq_ids, batch.starts)):
            self.layout.write_tokens(self.seqs[sid][layer, s // self.bs], s % self.bs, k_new[b, :, None],
                                     v_new[b, :, None])
        data = torch.cat([self.seqs[sid][layer, items.block[items.seq == b]] for b, sid in enumerate(batch.seq_ids)])
        o, lse = attend_slots(self.layout, None, self.threads, q, items.row, items.first, items.last, None, data,
                              items.masks)
        parts = Parts(B, H, D, self.device, False, self.threads)
        parts.add(items.row, items.keys, o, lse)
        return parts.merge()

    # ---- speculation: verify, commit / rollback, reading KV back ----
    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``: every sequence's L
        tokens over its committed KV (the chunks and the tail block, as decode attends them)
        merged with the tokens over each other (causal). Their k/v are written past the
        committed tokens and stay only as far as :meth:`commit` says."""
        self._count_pending()
        B, H, L, D = q.shape
        kb, vb = k.to(self.kv_dtype), v.to(self.kv_dtype)                        # [B, H_kv, L, D]
        parts = Parts(B * L, H, D, self.device, self.kernel is not None, self.threads)
        sb = self.layout.slot_bytes
        q_rows = q.transpose(1, 2).float().reshape(B * L, H, D)
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            slots = self._slots(sid, start + L)[layer]
            n = -(-start // self.bs)                                               # committed blocks
            first, chunk = self.layout.chunk_runs(np.arange(start // self.bs, dtype=np.int64))
            firsts = list(first) + ([first[-1] + 1] if n > start // self.bs else [])
            keys = list(chunk) + ([TAIL_KEY] if n > start // self.bs else [])
            lasts = [self.bs] * len(chunk) + ([start % self.bs] if n > start // self.bs else [])
            if keys:
                rows_i, first_i, idx = _expand(np.asarray(firsts, np.int64), L, b)
                blocks = np.arange(n, dtype=np.int64)[idx]
                last = np.repeat(np.asarray(lasts, np.int64), L)
                if self.kernel is not None:
                    o, lse = attend_slots(self.layout, self.kernel, self.threads, q_rows, rows_i, first_i, last,
                                          slots.data_ptr() + blocks * sb, None, None)
                else:
                    o, lse = attend_slots(self.layout, None, self.threads, q_rows, rows_i, first_i, last, None,
                                          slots[torch.from_numpy(blocks).to(self.device)], None)
                parts.add(rows_i, np.repeat(np.asarray(keys, np.int64), L), o, lse)
            o_own, lse_own = attend_lse(q[b], kb[b], vb[b], causal=True)            # [H, L, D], [H, L]
            parts.add(b * L + np.arange(L), np.full(L, OWN_KEY), o_own.transpose(0, 1), lse_own.transpose(0, 1))
            self.layout.write_range(slots, start, kb[b], vb[b])
            staged = self._staged.setdefault(sid, (start, [None] * self.cfg.num_layers))
            staged[1][layer] = (kb[b], vb[b])
        return parts.merge()[0].view(B, L, H, D).to(q.dtype)

    def commit(self, seq_id: int, n: int) -> None:
        """Keep the first ``n`` tokens of the last verify pass; the others are rolled back (their
        slots are past the sequence's length: the next pass writes over them)."""
        start, layers = self._staged.pop(seq_id)
        L = layers[0][0].shape[1]
        if not 0 <= n <= L:
            raise ValueError(f"commit of {n} tokens from a verify pass of {L}")
        if n:
            if self.policy is not None:
                for layer, (kb, vb) in enumerate(layers):
                    self.policy.append(layer, seq_id, start, kb[:, :n], vb[:, :n])
            self.decode_tokens += n

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens (later slots are dead: the
        next pass writes over them)."""
        if self.policy is not None:
            raise ConfigError("truncating a sequence is not supported with a sparse policy (its metadata is append-only)")
        self._staged.pop(seq_id, None)
        self._slots(seq_id, length)

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``."""
        slots = self.seqs[seq_id]
        nl, H_kv, n = index.shape
        D, bs = self.cfg.head_dim, self.bs
        idx = index.cpu().numpy()
        K = torch.empty(nl, H_kv, n, D, dtype=self.kv_dtype, device=self.device)
        V = torch.empty_like(K)
        for layer in range(nl):
            need = np.unique(idx[layer] // bs)
            k_all, v_all = self.layout.unpack(slots[layer, torch.from_numpy(need).to(self.device)])
            local = np.searchsorted(need, idx[layer] // bs) * bs + idx[layer] % bs
            li = torch.from_numpy(local).to(self.device)[..., None].expand(-1, -1, D)
            K[layer], V[layer] = k_all.gather(1, li), v_all.gather(1, li)
        return K, V

    def write(self, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V ``[layers, H_kv, n, D]`` as the sequence's tokens ``start .. start+n-1``
        (a draft cache filled from another store)."""
        slots = self._slots(seq_id, start + k.shape[2])
        for layer in range(k.shape[0]):
            self.layout.write_range(slots[layer], start, k[layer].to(self.kv_dtype), v[layer].to(self.kv_dtype))

    # ---- whole blocks in and out (the persistent store) ----
    def read_slots(self, seq_id: int, first: int, n: int) -> torch.Tensor:
        """``[layers, n, slot_elems]``: full blocks ``first .. first+n-1`` of every layer, as stored."""
        return self._slots(seq_id, (first + n) * self.bs)[:, first:first + n].clone()

    def slot_buffer(self, seq_id: int, first: int, n: int) -> torch.Tensor | None:
        """``[layers, n, slot_elems]``: where blocks ``first ..`` of the sequence live (a view,
        CPU only: the persistent store reads its blocks straight into it), else None."""
        if self.device.type != "cpu":
            return None
        return self._slots(seq_id, (first + n) * self.bs)[:, first:first + n]

    def load_slots(self, seq_id: int, first: int, slots: torch.Tensor) -> None:
        """Blocks ``[layers, n, slot_elems]`` become the sequence's blocks ``first ..``, as if
        prefilled (the policy's metadata built); already in place when ``slots`` is a view of
        :meth:`slot_buffer`."""
        n = slots.shape[1]
        dst = self._slots(seq_id, (first + n) * self.bs)[:, first:first + n]
        if not (slots.data_ptr() == dst.data_ptr() and slots.stride() == dst.stride()):
            dst.copy_(slots.to(self.device))
        if self.policy is not None:
            for layer in range(self.cfg.num_layers):
                self.policy.append(layer, seq_id, first * self.bs, *self.layout.unpack(slots[layer]))

    def share_prefix(self, seq_id: int, source: int, blocks: int) -> None:
        """The first ``blocks`` full blocks of sequence ``source`` become ``seq_id``'s, as if
        prefilled: copied (each sequence here is one buffer; the tiered store shares them)."""
        self.load_slots(seq_id, 0, self.seqs[source][:, :blocks])

    # ---- reporting ----
    def stats(self) -> KVStats:
        return KVStats(held={"memory": self.bytes_held()}, decode_tokens=self.decode_tokens,
                       sparse=self.sparse_stats if self.policy is not None else None)

    def report(self) -> list[str]:
        if self.policy is None:
            return []
        line = sparse_line(self.policy.name, self.policy.cfg.sparse_budget, self.sparse_stats)
        return [line] if line else []

    def close(self) -> None:
        self.seqs.clear()


def _expand(first: np.ndarray, L: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items (block ranges ``first``) of batch row ``b`` for each of its L query rows."""
    from kvoffload.kv.tiers.protocol import expand_rows

    return expand_rows(np.full(len(first) - 1, b, np.int64), first, L)
