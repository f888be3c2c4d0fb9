"""Tiered KV backend: the block store's chunks spread over an ordered list of tiers, attention
computed where they live, partial results merged in a fixed order.

Per layer of a decode step: the new token's k/v go into the sequence's write-combining tail;
each tier's worker gets the queries and the chunks of its own to attend (one request per tier
for the whole batch) and returns one partial output (with its log-sum-exp) per chunk; the tail
block is attended here; the partials merge in sequence order (attention/merge.py). Only q goes
in and only (o, lse) comes out: the KV itself never crosses a tier boundary during decode. No
tier is named here: a tier is whatever kv/tiers/registry.py builds from the configured list.

A prompt chunk attends the earlier tokens read back exactly from their tiers (the compute
device's flash attention; the same call the in-memory backend makes, so a prefill's output
does not depend on the placement either), then its k/v are handed to the store.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from kvoffload.attention.backend import KVStats, sparse_line, tier_line
from kvoffload.attention.merge import OWN_KEY, TAIL_KEY, Parts
from kvoffload.attention.ops import attend_lse, own_attention, prefix_attention
from kvoffload.config import KVConfig, ModelConfig
from kvoffload.dtypes import name_of
from kvoffload.errors import ConfigError
from kvoffload.kernels.hook import AttnHook, KVConvert
from kvoffload.kernels.paged import Append, Items, PairedCall, PreparedCall, merge_parts
from kvoffload.kernels.select import INFO_NBLOCKS, INFO_READ, NativeSelect, SparseStep
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.store import BlockStore, build_tiers
from kvoffload.kv.tiers.memory import attend_slots, paged_kernel
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    TierContext,
    TierCounters,
    TierSpec,
    expand_rows,
    read_bytes,
)
from kvoffload.model.interface import ForwardBatch, Logits
from kvoffload.sparse.base import Selection, SparseCounters, SparsePolicy, mean_mix


class _Items:
    """One tier's items of a step, being collected: per item its batch row and merge key, per
    block its tier slot (and token mask)."""

    def __init__(self) -> None:
        self.seq: list[np.ndarray] = []
        self.key: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def request(self, layer: int, q, masked: bool) -> tuple[AttendRequest, np.ndarray]:
        counts = np.concatenate(self.counts)
        first = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=first[1:])
        req = AttendRequest(layer, q, np.concatenate(self.seq), first, np.concatenate(self.slots),
                            np.concatenate(self.masks) if masked else None)
        return req, np.concatenate(self.key)


class _StepState:
    """A decode batch's per-step arrays shared by every layer's prepared tail call: each
    sequence's token column in its tail block, and the tail item's token count."""

    def __init__(self, seq_ids: tuple[int, ...]) -> None:
        self.seq_ids = seq_ids
        self.cols = np.zeros(len(seq_ids), np.int64)
        self.last = np.ones(len(seq_ids), np.int64)
        self.batch: ForwardBatch | None = None

    def update(self, batch: ForwardBatch, bs: int) -> None:
        if self.batch is not batch:
            self.cols[:] = np.asarray(batch.starts, np.int64) % bs
            self.last[:] = self.cols + 1
            self.batch = batch


class _LayerPlan:
    """A dense decode layer of one batch, prepared while its chunks stay where they are: per
    tier the request's items (q filled in per step), the tail blocks' prepared kernel call
    (append + attend), and the fixed merge order of the parts (tails, then the tiers'). When
    every chunk is in a memory tier, the same calls and merge as one native hook (:meth:`hook`)."""

    def __init__(self, be: TieredBackend, layer: int, seq_ids: tuple[int, ...], step: _StepState, key: tuple) -> None:
        B = len(seq_ids)
        self.key = key
        self.reqs = [(t, req, keys) for t, req, keys in
                     (r for r in be._requests(layer, seq_ids, None, None) if r is not None)]
        for _, req, _ in self.reqs:
            req.key = (layer, seq_ids, key)
        self.tail = self.pair = None
        self._hook: AttnHook | None = None
        if be.kernel is not None:
            # the tails' parts and the blocks' back to back: a share each of one pair's buffers
            self.pair = PairedCall(be.H, be.cfg.head_dim, B, sum(req.num_items for _, req, _ in self.reqs))
            addrs = be.store.tails.addrs[np.array([be.store.tail_slot[sid][layer] for sid in seq_ids], np.int64)]
            items = Items(np.arange(B, dtype=np.int64), np.arange(B + 1, dtype=np.int64), step.last, addrs)
            self.tail = PreparedCall(be.kernel, items, 1 if B < 8 else be.threads, addrs, step.cols,
                                     parts=self.pair.share(0))
        rows = np.concatenate([np.arange(B, dtype=np.int64)] + [req.seq for _, req, _ in self.reqs])
        keys = np.concatenate([np.full(B, TAIL_KEY, np.int64)] + [k for _, _, k in self.reqs])
        self.order = np.lexsort((keys, rows)).astype(np.int64)
        self.row_first = np.searchsorted(rows[self.order], np.arange(B + 1)).astype(np.int64)
        # what a hooked step counts (a step through the tiers counts the same at collect)
        self.reads = [(t, read_bytes(be.layout, len(req.slots), None), len(req.slots)) for t, req, _ in self.reqs]
        self.hookable = (self.tail is not None and be.block_kernel is not None
                         and all(t in be._memory_tiers for t, _, _ in self.reqs))

    def hook(self, be: TieredBackend) -> AttnHook | None:
        """The layer as one native hook (kernels/paged.py's :class:`PairedCall`): the tails'
        call, one call over the memory tiers' blocks by address (the items each tier's call
        would attend, in the same order), the merge in :attr:`order` — the bits of
        :meth:`TieredBackend._decode_dense`. None when a chunk is on another kind of tier."""
        if not self.hookable:
            return None
        if self._hook is None:
            reqs = [(t, req) for t, req, _ in self.reqs]
            blocks = None
            if reqs:
                N = sum(req.num_items for _, req in reqs)
                first = np.zeros(N + 1, np.int64)
                np.cumsum(np.concatenate([np.diff(req.first) for _, req in reqs]), out=first[1:])
                items = Items(np.concatenate([req.seq for _, req in reqs]), first,
                              np.full(N, be.bs, np.int64),
                              np.concatenate([be.tiers[t].locs(req.slots) for t, req in reqs]))
                blocks = PreparedCall(be.block_kernel, items, be.threads, parts=self.pair.share(1))
            self._hook = self.pair.hook(self.tail, blocks, self.row_first, self.order, 1)
        return self._hook


class TieredBackend:
    def __init__(self, cfg: ModelConfig, kv: KVConfig, device: torch.device, kv_dtype: torch.dtype,
                 act_dtype: torch.dtype, threads: int, native: bool = True,
                 policy: SparsePolicy | None = None, stored: str | None = None) -> None:
        """kv_dtype: the dtype k/v are written in (the tails'); stored: the blocks' format
        (``None``: kv_dtype's; ``int8`` / ``int4``: compressed, kv/layout.py)."""
        self.cfg, self.kvcfg, self.device, self.kv_dtype, self.act_dtype = cfg, kv, device, kv_dtype, act_dtype
        self.bs = kv.block_size
        self.layout = lay = BlockLayout.for_kv(kv, cfg.num_kv_heads, cfg.head_dim, stored or name_of(kv_dtype))
        self.tail_layout = tail = lay.full(name_of(kv_dtype))                 # the write-combining tails
        self.H, self.G, self.threads = cfg.num_heads, cfg.num_heads // cfg.num_kv_heads, threads
        ctx = TierContext(lay, self.G, device, threads, kv, native)
        specs = tuple(TierSpec(name, budget) for name, budget in kv.tier_list(device.type))
        tiers = build_tiers(specs, ctx)
        if not tiers:
            raise ConfigError("every KV tier has a budget of 0: nowhere to put the KV")
        # a sparse policy's dense layers read their whole KV every step: they leave the fast tiers last
        hot = frozenset(i for i in range(cfg.num_layers) if not policy.sparse(i)) if policy is not None else frozenset()
        # with a block cache on disk the sparse layers' sink and recent blocks are held there, block by block
        cached = frozenset(range(cfg.num_layers)) - hot if policy is not None and kv.disk_block_cache else frozenset()
        self.store = BlockStore(tiers, ctx, cfg.num_layers, kv.kv_sink_tokens, kv.kv_recent_tokens, hot, cached, tail)
        self.tiers = tiers
        self.kernel = paged_kernel(dataclasses.replace(ctx, layout=tail), device)   # the tails' native kernel
        self.block_kernel = paged_kernel(ctx, device)                            # the blocks' (stored dtype)
        self.tail_counters = TierCounters()
        # seq -> (start, per layer (k, v) [H_kv, L, D]) of its last verify pass, until commit
        self._staged: dict[int, tuple[int, list]] = {}
        # (seq, layer) -> (placement stamp, per tier (item keys, counts, slots)) of a dense step
        self._items: dict[tuple[int, int], tuple[int, list]] = {}
        self._memo: tuple[ForwardBatch, np.ndarray] | None = None
        self._step_state: _StepState | None = None
        self._plans: dict[int, _LayerPlan] = {}             # layer -> its plan for the current batch
        self.decode_tokens = 0
        self.policy = policy                 # sparse decode: which blocks each step reads
        self.sparse_stats = SparseCounters()
        # A sparse layer in native code (:meth:`_direct_tiers`) when kernels attend the tails and
        # the blocks (the same one, or for compressed blocks their own beside the tails')
        self._direct = self.kernel is not None and self.block_kernel is not None
        self._memory_tiers = [i for i, t in enumerate(tiers) if t.direct and t.fetch is None]
        self.one_call = True       # False: a native sparse layer goes through per-tier requests (tests compare)
        self.native_hook = True    # False: fused layers call decode() (tests compare)
        self._convert = KVConvert(name_of(kv_dtype), cfg.num_kv_heads * cfg.head_dim)   # k/v of another dtype, for hooks
        self._step: SparseStep | None = None
        # decode micro-batches call in from several threads: one at a time in here (their model
        # compute outside overlaps); tiers, placement and counters are not shared otherwise
        self._lock = threading.Lock()

    # ---- sequence lifecycle ----
    def allocate(self, seq_id: int, capacity: int) -> None:
        self.store.allocate(seq_id)
        if self.policy is not None:
            self.policy.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        if seq_id not in self.store:
            return
        self.store.free(seq_id)
        for layer in range(self.cfg.num_layers):
            self._items.pop((seq_id, layer), None)
        self._staged.pop(seq_id, None)
        if self.policy is not None:
            self.policy.free(seq_id)

    def close(self) -> None:
        """Stop the tiers' workers and remove their files (also done at exit)."""
        self.store.close()

    # ---- what each tier attends ----
    def _seq_items(self, seq_id: int, layer: int, sel: Selection | None) -> list:
        """Per tier, (merge keys, block counts, tier slots, masks) of the items of one sequence:
        its full blocks (or a selection's), cut into chunks; a chunk lives in one tier."""
        tiers, slots = self.store.table(seq_id, layer)
        if sel is None:
            stamp = self.store.placement.stamp.get((seq_id, layer), 0)
            hit = self._items.get((seq_id, layer))
            if hit is not None and hit[0] == stamp:
                return hit[1]
            blocks, masks = np.arange(len(tiers), dtype=np.int64), None
        else:
            blocks, masks = sel.union(self.bs)
        first, chunk = self.layout.chunk_runs(blocks)
        item_tier = tiers[blocks[first[:-1]]] if len(chunk) else np.zeros(0, np.int64)
        counts = np.diff(first)
        block_tier = np.repeat(item_tier, counts)                               # [len(blocks)]
        out = []
        for t in range(len(self.tiers)):
            pick = np.nonzero(item_tier == t)[0]
            if len(pick) == 0:
                out.append(None)
                continue
            bidx = np.nonzero(block_tier == t)[0]                               # its items' blocks, in order
            out.append((chunk[pick], counts[pick], slots[blocks[bidx]], None if masks is None else masks[bidx]))
        if sel is None:
            self._items[(seq_id, layer)] = (self.store.placement.stamp.get((seq_id, layer), 0), out)
        return out

    def _requests(self, layer: int, seq_ids: tuple[int, ...], q, chosen: list[Selection] | None,
                  ) -> list[tuple[int, AttendRequest, np.ndarray] | None]:
        """Per tier: its request for the batch and the items' merge keys (None: nothing there)."""
        per_tier = [_Items() for _ in self.tiers]
        for b, sid in enumerate(seq_ids):
            for t, it in enumerate(self._seq_items(sid, layer, None if chosen is None else chosen[b])):
                if it is None:
                    continue
                keys, counts, slots, masks = it
                acc = per_tier[t]
                acc.seq.append(np.full(len(keys), b, np.int64))
                acc.key.append(keys)
                acc.counts.append(counts)
                acc.slots.append(slots)
                if masks is not None:
                    acc.masks.append(masks)
        out = []
        for t, acc in enumerate(per_tier):
            if not acc.seq:
                out.append(None)
                continue
            req, keys = acc.request(layer, q, chosen is not None)
            out.append((t, req, keys))
        return out

    def _attend_tiers(self, reqs: list, parts: Parts, L: int, local) -> None:
        """Submit every tier's request (the slowest first), run ``local()`` (work done here while
        they read: the tails, the next layer's prefetch), then collect the tiers fastest first
        (an in-process tier computes at collect); their partials join ``parts``."""
        active = [r for r in reqs if r is not None]
        if not self.kvcfg.kv_serial:
            for t, req, _ in reversed(active):
                self.tiers[t].submit(req)
        local()
        for t, req, keys in active:
            if self.kvcfg.kv_serial:
                self.tiers[t].submit(req)
            r = self.tiers[t].collect()
            N = req.num_items
            rows = (np.repeat(req.seq * L, L) + np.tile(np.arange(L), N)) if L > 1 else req.seq
            parts.add(rows, np.repeat(keys, L), torch.as_tensor(r.o).reshape(N * L, self.H, -1),
                      torch.as_tensor(r.lse).reshape(N * L, self.H))

    def _tail_addrs(self, batch: ForwardBatch) -> np.ndarray:
        """``[layers, B]``: the batch's tail slot addresses, looked up once per forward."""
        if self._memo is None or self._memo[0] is not batch:
            addrs = np.stack([self.store.tails.addrs[self.store.tail_slot[sid]] for sid in batch.seq_ids], axis=1)
            self._memo = (batch, addrs)
        return self._memo[1]

    def _tail_parts(self, layer: int, batch: ForwardBatch, q_rows: torch.Tensor, L: int, lens: np.ndarray,
                    parts: Parts, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                    cols: np.ndarray | None = None) -> None:
        """Each sequence's tail block as one more item (``lens[b]`` tokens; 0: none), for its L
        query rows; decode appends the new token (``k_new`` ``[B, H_kv, D]`` at ``cols``) first."""
        store, lay, seq_ids = self.store, self.tail_layout, batch.seq_ids
        has = np.nonzero(lens > 0)[0]
        if len(has) == 0:
            return
        _, H, D = q_rows.shape
        row, first, _ = expand_rows(has, np.arange(len(has) + 1, dtype=np.int64), L)
        last = np.repeat(lens[has], L)
        if self.kernel is not None:
            addrs = self._tail_addrs(batch)[layer]
            o, lse = np.empty((len(row), H, D), np.float32), np.empty((len(row), H), np.float32)
            append = None if k_new is None else Append(k_new, v_new, addrs, cols)
            # one block per row: small work, one thread (a parallel region costs more than it saves)
            self.kernel(q_rows.numpy(), Items(row, first, last, np.repeat(addrs[has], L), None), o, lse,
                        1 if len(row) < 8 else self.threads, append=append)
        else:
            if k_new is not None:
                for b, sid in enumerate(seq_ids):
                    lay.write_tokens(store.tail_view(sid, layer), int(cols[b]), k_new[b, :, None], v_new[b, :, None])
            data = torch.stack([store.tail_view(seq_ids[b], layer) for b in has])
            o, lse = attend_slots(lay, None, self.threads, q_rows, row, first, last, None,
                                  data[torch.from_numpy(np.repeat(np.arange(len(has)), L)).to(data.device)], None)
        self.tail_counters.read += int(lens[has].sum()) * lay.token_bytes(1)
        parts.add(row, np.full(len(row), TAIL_KEY), o, lse)

    # ---- attention ----
    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, 1, D]``, k/v ``[B, H_kv, 1, D]`` -> ``[B, 1, H, D]``."""
        with self._lock:
            return self._decode(layer, q, k, v, batch)

    def native_decode(self, layer: int, batch: ForwardBatch, dtype: torch.dtype) -> AttnHook | None:
        """A dense decode layer whose chunks are all in memory tiers, as a native hook
        (kernels/kvo_hook.h) that the fused layer runs inside its own call: what :meth:`decode`
        runs through :meth:`_decode_dense` (append to the tails, the tails' and the blocks'
        calls, the merge), the same bits, without the trip through Python; a tail that fills
        this step becomes a block after the call (:meth:`native_done`). A sparse layer's direct
        step likewise (:meth:`_sparse_hook`). None (``decode`` runs) where a layer does more: a
        chunk on a tier that is read or attended elsewhere (disk); a sparse layer with no direct
        step, or an output correction (SparF), or a guessed read-ahead; another forward at the
        same time (decode micro-batches: the tiers' placement is shared). k/v of another dtype
        than the tails' are rounded to it in the hook (:class:`KVConvert`), as :meth:`decode`
        does."""
        pol = self.policy
        if (self.kernel is None or self.block_kernel is None or not self.native_hook or batch.concurrent
                or (pol is not None and pol.cfg.sparse_prefetch)):
            return None
        with self._lock:
            if pol is not None and pol.sparse(layer):
                hook = self._sparse_hook(layer, batch, dtype)
                if hook is None:
                    return None
            else:
                plan = self._plan(layer, batch)
                hook = plan.hook(self)
                if hook is None:
                    return None
                if not self.kvcfg.kv_serial:
                    self._prefetch_next(layer, batch, None)                      # (a dense next layer's chunks)
                for t, read, n in plan.reads:
                    self.tiers[t].counters.attended(read, n)
                self._count_tails()
            if layer == self.cfg.num_layers - 1:
                self.decode_tokens += len(batch.seq_ids)
        return hook if dtype == self.kv_dtype else self._convert.wrap(hook, name_of(dtype), len(batch.seq_ids))

    def _sparse_hook(self, layer: int, batch: ForwardBatch, dtype: torch.dtype) -> AttnHook | None:
        """A sparse layer's direct step (:meth:`_sparse_direct`) as a native hook, where it has
        nothing to read between its two calls: every block in a memory tier. Its counts are
        taken in :meth:`native_done`."""
        pol = self.policy
        if not (self._direct and self.one_call) or pol.rebuilds_keys or self._direct_tiers() != (True, None):
            return None
        sel = pol.native_kernel_for(dtype, self.kv_dtype)
        if sel is None or sel.sparf:                         # (SparF: an output correction after the call)
            return None
        step, _, locs = self._step_over(sel, layer, batch)
        seq_ids, starts = batch.seq_ids, batch.starts
        return step.hook(starts, pol.native_table(layer, seq_ids, starts), pol.native_aux(layer), None,
                         self.kv_dtype, locs, self._tail_addrs(batch)[layer])

    def native_done(self, layer: int, batch: ForwardBatch) -> None:
        """After a hooked layer's call: what :meth:`decode` does after its attention — a sparse
        layer's counts (its hook was :meth:`_sparse_hook`'s; its block tables as then: nothing
        has moved since); each tail that the new token filled becomes a block (placed,
        compressed if the blocks are), the queued writes go out."""
        with self._lock:
            if self.policy is not None and self.policy.sparse(layer):
                tables = [self.store.locations(sid, layer) for sid in batch.seq_ids]
                self._count_sparse(self._step, tables, batch.starts, np.zeros(0, np.int64))
            self._tails_filled(layer, batch)

    def _tails_filled(self, layer: int, batch: ForwardBatch) -> None:
        for sid, s in zip(batch.seq_ids, batch.starts):
            if (s + 1) % self.bs == 0:                                          # the tail is full
                self.store.flush_tail(sid, layer)
        self.store.send()

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        kvd = self.kv_dtype
        k_new, v_new = k[:, :, 0].to(kvd), v[:, :, 0].to(kvd)                   # [B, H_kv, D]
        sel = chosen = rebuilt = read_tier = None
        if self.policy is not None and self.policy.sparse(layer):
            pol = self.policy
            if self._direct and self.one_call and not pol.rebuilds_keys and not pol.cfg.sparse_prefetch:
                direct, read_tier = self._direct_tiers()
                sel = pol.native_kernel(q[:, :, 0], k_new, v_new) if direct else None
            if sel is None:
                chosen = pol.select_batch(layer, batch.seq_ids, q[:, :, 0], batch.starts, k_new, v_new)
                if pol.rebuilds_keys:
                    chosen, rebuilt = pol.split_rebuilt(layer, batch.seq_ids, batch.starts, chosen)
        if sel is not None:
            o = self._sparse_direct(sel, layer, q[:, :, 0], k_new, v_new, batch, read_tier)
        else:
            q_rows = q[:, :, 0].float()                                          # [B, H, D]
            if chosen is None and self.kernel is not None:
                o = self._decode_dense(layer, q_rows, k_new, v_new, batch)
            else:
                o = self._decode_items(layer, q_rows, k_new, v_new, batch, chosen, rebuilt)
        self._tails_filled(layer, batch)
        if layer == self.cfg.num_layers - 1:
            self.decode_tokens += len(batch.seq_ids)
        return o.unsqueeze(1).to(q.dtype)

    def _direct_tiers(self) -> tuple[bool, int | None]:
        """(whether this process attends every tier that holds a chunk now by address -- memory
        tiers, a disk shard read here: Tier.direct -- with at most one of them a *read tier*,
        whose blocks are read first; that tier or None). A tier that holds nothing does not
        count: with a host budget the KV fits, the disk workers idle and the step stays direct."""
        held = [i for i, t in enumerate(self.tiers) if t.used]
        reads = [i for i in held if self.tiers[i].direct and self.tiers[i].fetch is not None]
        return all(self.tiers[i].direct for i in held) and len(reads) <= 1, (reads[0] if reads else None)

    def _step_over(self, sel: NativeSelect, layer: int, batch: ForwardBatch) -> tuple[SparseStep, list, np.ndarray]:
        """The direct step running ``sel`` (made once), the batch's block tables at ``layer``
        (:meth:`BlockStore.locations`) and the addresses of their location arrays ``[B]``."""
        step = self._step = SparseStep.reuse(self._step, sel, self.kernel, self.layout, self.threads,
                                             self.block_kernel)
        tables = [self.store.locations(sid, layer) for sid in batch.seq_ids]
        return step, tables, np.array([t[1].ctypes.data for t in tables], np.int64)

    def _sparse_direct(self, sel: NativeSelect, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, batch: ForwardBatch, rt: int | None) -> torch.Tensor:
        """A sparse decode layer over in-process tiers, in native code but for the reads: the
        selection and the items with every block's address (kernels/select.py's
        :meth:`SparseStep.plan`), the read tier's blocks not in RAM read (:meth:`Tier.fetch`),
        then append + attend + merge (:meth:`SparseStep.attend`). The items, the kernel and the
        merge order are those of the per-tier requests and of the in-memory backend: the same
        bits. q ``[B, H, D]`` (the model's dtype) -> ``[B, H, D]`` fp32; rt: the read tier
        (:meth:`_direct_tiers`)."""
        pol = self.policy
        step, tables, locs = self._step_over(sel, layer, batch)
        seq_ids, starts = batch.seq_ids, batch.starts
        B, H, D = q.shape
        out, lse = torch.empty(B, H, D), torch.empty(B, H)
        _, alpha, vmean = step.plan(starts, q, k_new, v_new, pol.native_table(layer, seq_ids, starts),
                                    pol.native_aux(layer), locs, self._tail_addrs(batch)[layer],
                                    None if rt is None else self.tiers[rt].resident, q.float(), out, lse)
        refs, slots = step.refs
        if len(refs):
            self.tiers[rt].fetch(layer, slots, step.ptrs, refs)
        if not self.kvcfg.kv_serial:
            self._prefetch_next(layer, batch, None)               # (a dense next layer: its chunks are known)
        step.attend()
        self._count_sparse(step, tables, starts, refs)
        return out if alpha is None else mean_mix(out, alpha, vmean)

    def _count_sparse(self, step: SparseStep, tables: list, starts: tuple[int, ...], refs: np.ndarray) -> None:
        """A direct sparse layer's counters, from the step's last call: the tiers', the tails'
        and the policy's."""
        info, H_kv = step.info(len(starts)), self.cfg.num_kv_heads
        self._count_direct(step, tables, info, refs)
        self.tail_counters.read += sum(s % self.bs + 1 for s in starts) * self.tail_layout.token_bytes(1)
        self.sparse_stats.add_native(starts, info, H_kv, self.bs, self.layout.token_bytes(1) // H_kv)

    def _count_direct(self, step: SparseStep, tables: list, info: np.ndarray, refs: np.ndarray) -> None:
        """The memory tiers' counters for a direct sparse layer (the read tier counts its own
        in fetch): blocks attended, and bytes as a request reads them (only the KV heads' runs
        some token of which is attended: protocol.read_bytes). refs: the read tier's item blocks
        (:attr:`SparseStep.refs`)."""
        B, mem = len(tables), self._memory_tiers
        sb, H_kv = self.layout.slot_bytes, self.cfg.num_kv_heads
        if len(mem) == 1:                                         # one memory tier: all but the read tier's
            heads = int(info[:, INFO_READ].sum()) - int(np.count_nonzero(step.masks_of(refs)))   # (block, head) runs
            self.tiers[mem[0]].counters.attended(heads * sb // H_kv, int(info[:, INFO_NBLOCKS].sum()) - len(refs))
            return
        for b, (tiers, _) in enumerate(tables):
            blocks, masks = step.union(b, B)
            where = tiers[blocks]
            for i in mem:
                pick = where == i
                self.tiers[i].counters.attended(int(np.count_nonzero(masks[pick])) * sb // H_kv, int(pick.sum()))

    def _plan(self, layer: int, batch: ForwardBatch) -> _LayerPlan:
        """The layer's prepared dense step (rebuilt when the batch changes or a chunk of it moved)."""
        st = self._step_state
        if st is None or st.seq_ids != batch.seq_ids:
            st = self._step_state = _StepState(batch.seq_ids)
            self._plans.clear()
        st.update(batch, self.bs)
        stamps = self.store.placement.stamp
        key = tuple(stamps.get((sid, layer), 0) for sid in batch.seq_ids)
        plan = self._plans.get(layer)
        if plan is None or plan.key != key:
            plan = self._plans[layer] = _LayerPlan(self, layer, batch.seq_ids, st, key)
        return plan

    def _decode_dense(self, layer: int, q_rows: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      batch: ForwardBatch) -> torch.Tensor:
        """A dense decode layer through its prepared plan: the tiers' requests are submitted
        (slowest first), the tails attended here, the tiers collected fastest first, then one
        merge in the plan's fixed order. q_rows ``[B, H, D]`` fp32 -> ``[B, H, D]``."""
        B, H, D = q_rows.shape
        plan = self._plan(layer, batch)
        q = q_rows[:, None]                                                      # [B, 1, H, D]
        reqs = [(t, AttendRequest(layer, q, r.seq, r.first, r.slots, None, r.key)) for t, r, _ in plan.reqs]
        serial = self.kvcfg.kv_serial
        if not serial:
            for t, req in reversed(reqs):
                self.tiers[t].submit(req)
            self._prefetch_next(layer, batch, q_rows)
        plan.tail(q_rows, k_new, v_new)
        self._count_tails()
        os_, ls_ = [plan.tail.part_o[:B]], [plan.tail.part_lse[:B]]
        for t, req in reqs:
            if serial:
                self.tiers[t].submit(req)
            r = self.tiers[t].collect()
            os_.append(np.asarray(r.o).reshape(-1, H, D))
            ls_.append(np.asarray(r.lse).reshape(-1, H))
        out, lse = torch.empty(B, H, D), torch.empty(B, H)
        merge_parts(plan.row_first, plan.order, np.concatenate(os_), np.concatenate(ls_), out, lse, 1)
        return out

    def _count_tails(self) -> None:
        """A dense step's tails read (each sequence's tokens in its tail block, the new one included)."""
        self.tail_counters.read += int(self._step_state.last.sum()) * self.tail_layout.token_bytes(1)

    def _decode_items(self, layer: int, q_rows: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      batch: ForwardBatch, chosen: list[Selection] | None, rebuilt: list | None = None,
                      ) -> torch.Tensor:
        """A decode layer item by item (sparse selections, or no native kernel) -> ``[B, H, D]``;
        ``rebuilt``: the chunks the policy attends with keys of its own (their values read here)."""
        B, H, D = q_rows.shape
        reqs = self._requests(layer, batch.seq_ids, q_rows[:, None], chosen)
        parts = Parts(B, H, D, self.device, self.kernel is not None, self.threads)
        starts = np.array(batch.starts, np.int64)

        def local() -> None:
            if not self.kvcfg.kv_serial:
                self._prefetch_next(layer, batch, q_rows)
            self._tail_parts(layer, batch, q_rows, 1, starts % self.bs + 1, parts, k_new, v_new, starts % self.bs)

        self._attend_tiers(reqs, parts, 1, local)
        o, lse = parts.merge()                                                   # [B, H, D], [B, H]
        if rebuilt is not None:
            o = self.policy.attend_rebuilt(rebuilt, q_rows, o, lse, lambda b, blocks: self.store.read_kv(
                batch.seq_ids[b], layer, blocks)[1])
        if chosen is not None:
            o = self.sparse_stats.finish(chosen, o, batch.starts, self.bs, self.layout.token_bytes(1) // self.cfg.num_kv_heads)
        return o

    def _prefetch_next(self, layer: int, batch: ForwardBatch, q_rows: torch.Tensor | None) -> None:
        """Tell the tiers the next layer's items (after the last layer: the next step's first
        layer's), so a disk tier reads them while this layer and the next one's projections
        compute: all its chunks when it is dense (known before its query is); when it is
        sparse, what its policy would choose for this layer's query q_rows ``[B, H, D]`` (a
        guess: the next layer attends what its own selection chooses; blocks the guess missed
        are read then)."""
        nxt = layer + 1
        if not any(t.prefetches and t.used for t in self.tiers):    # (no chunk where a hint is used)
            return
        wrap = nxt == self.cfg.num_layers
        if wrap:
            # the next step's first layer: its chunks are this step's unless a block fills
            # meanwhile (then the new block is read on demand); a guess would come from another
            # layer's query, so a sparse first layer is not read ahead
            nxt = 0
        if self.policy is not None and self.policy.sparse(nxt):
            if wrap or not self.policy.cfg.sparse_prefetch:
                return
            guess = self.policy.predict_batch(nxt, batch.seq_ids, q_rows, batch.starts)
            reqs = [r for r in self._requests(nxt, batch.seq_ids, None, guess) if r is not None]
        elif self.kernel is not None:
            reqs = self._plan(nxt, batch).reqs                                   # (prepared once per step)
        else:
            reqs = [r for r in self._requests(nxt, batch.seq_ids, None, None) if r is not None]
        for t, req, _ in reqs:
            if self.tiers[t].prefetches:
                self.tiers[t].prefetch(req)

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``."""
        outs = []
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            kb, vb = k[b].to(self.kv_dtype), v[b].to(self.kv_dtype)            # as stored: [H_kv, L, D]
            if start == 0:
                outs.append(own_attention(q[b], kb, vb))
            else:
                k_pre, v_pre = self.store.prefix(sid, layer, start)
                outs.append(prefix_attention(q[b], k_pre, v_pre, kb, vb))
            self.store.write(sid, layer, start, kb, vb)
            if self.policy is not None:
                self.policy.append(layer, sid, start, kb, vb)
                if batch.logits is Logits.LAST:                  # the prompt is complete
                    self.policy.prefilled(layer, sid, start + kb.shape[1])
        self.store.send()
        return torch.stack(outs)

    # ---- whole blocks in and out (the persistent store) ----
    def read_slots(self, seq_id: int, first: int, n: int) -> torch.Tensor:
        """``[layers, n, slot_elems]``: full blocks ``first .. first+n-1`` of every layer, as stored."""
        with self._lock:
            blocks = np.arange(first, first + n, dtype=np.int64)
            return torch.stack([self.store.read_blocks(seq_id, layer, blocks) for layer in range(self.cfg.num_layers)])

    def load_slots(self, seq_id: int, first: int, slots: torch.Tensor) -> None:
        """Blocks ``[layers, n, slot_elems]`` become the sequence's blocks ``first ..`` (its
        first ``first`` blocks are full, its tail empty), as if prefilled: placed in the tiers,
        the policy's metadata built."""
        with self._lock:
            for layer in range(self.cfg.num_layers):
                if self.store.placement.blocks[seq_id][layer] != first:
                    raise RuntimeError(f"load_slots at block {first} of sequence {seq_id}, which holds "
                                       f"{self.store.placement.blocks[seq_id][layer]}")
                self.store.append_slots(seq_id, layer, slots[layer])
                if self.policy is not None:
                    self.policy.append(layer, seq_id, first * self.bs, *self.layout.unpack(slots[layer]))
            self.store.send()

    def share_prefix(self, seq_id: int, source: int, blocks: int) -> None:
        """The first ``blocks`` full blocks of sequence ``source`` become ``seq_id``'s (which holds
        none), as if prefilled: whole chunks referenced by both block tables (held once), the
        rest copied; the policy's metadata built from them."""
        with self._lock:
            self.store.share(seq_id, source, blocks)
            if self.policy is not None:
                for layer in range(self.cfg.num_layers):
                    self.policy.append(layer, seq_id, 0, *self.store.prefix(seq_id, layer, blocks * self.bs))
            self.store.send()

    # ---- speculation: verify, commit / rollback, reading KV back ----
    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``: every sequence's L
        tokens over its committed KV (one request per tier for the whole batch: the workers
        take an L-token query block) merged with the tokens over each other (causal, here).
        Their k/v are staged in memory, not written, until :meth:`commit`."""
        with self._lock:
            B, H, L, D = q.shape
            kb, vb = k.to(self.kv_dtype), v.to(self.kv_dtype)                     # as stored: [B, H_kv, L, D]
            q_rows = q.transpose(1, 2).float().reshape(B * L, H, D)
            parts = Parts(B * L, H, D, self.device, self.kernel is not None, self.threads)
            reqs = self._requests(layer, batch.seq_ids, q_rows.view(B, L, H, D), None)
            starts = np.array(batch.starts, np.int64)
            self._attend_tiers(reqs, parts, L, lambda: self._tail_parts(layer, batch, q_rows, L, starts % self.bs,
                                                                        parts))
            for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
                o_own, lse_own = attend_lse(q[b], kb[b], vb[b], causal=True)            # [H, L, D], [H, L]
                parts.add(b * L + np.arange(L), np.full(L, OWN_KEY), o_own.transpose(0, 1), lse_own.transpose(0, 1))
                staged = self._staged.setdefault(sid, (start, [None] * self.cfg.num_layers))
                staged[1][layer] = (kb[b], vb[b])
            return parts.merge()[0].view(B, L, H, D).to(q.dtype)

    def commit(self, seq_id: int, n: int) -> None:
        """Write the first ``n`` staged tokens of the last verify pass into the store (tails,
        then blocks to their tiers, as a prefill chunk would); roll back the rest: they never
        reach a tier, so the disk stays append-only."""
        with self._lock:
            start, layers = self._staged.pop(seq_id)
            if any(x is None for x in layers):
                raise RuntimeError(f"commit of sequence {seq_id}: its verify pass did not reach every layer")
            L = layers[0][0].shape[1]
            if not 0 <= n <= L:
                raise ValueError(f"commit of {n} tokens from a verify pass of {L}")
            if n == 0:
                return
            for layer, (kb, vb) in enumerate(layers):
                self.store.write(seq_id, layer, start, kb[:, :n], vb[:, :n])
                if self.policy is not None:
                    self.policy.append(layer, seq_id, start, kb[:, :n], vb[:, :n])
            self.store.send()
            self.decode_tokens += n

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens."""
        with self._lock:
            if self.policy is not None:
                raise ConfigError("truncating a sequence is not supported with a sparse policy (its metadata is append-only)")
            self._staged.pop(seq_id, None)
            self.store.truncate(seq_id, length)

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``
        (committed tokens), read from whatever tier holds them."""
        with self._lock:
            return self.store.gather(seq_id, index)

    # ---- reporting ----
    def stats(self) -> KVStats:
        tiers = {t.name: t.counters for t in self.tiers}
        tiers["tails"] = self.tail_counters
        pids = [p for t in self.tiers for p in t.pids()]
        media = {t.name: t.medium for t in self.tiers} | {"tails": "memory"}
        return KVStats(tiers, self.store.memory_held(), self.decode_tokens,
                       self.sparse_stats if self.policy is not None else None, pids, media)

    def report(self) -> list[str]:
        lines = []
        if self.policy is not None:
            line = sparse_line(self.policy.name, self.policy.cfg.sparse_budget, self.sparse_stats)
            if line:
                lines.append(line)
        lines.append(tier_line(self.stats()))
        return lines
