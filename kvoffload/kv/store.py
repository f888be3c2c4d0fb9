"""The block store: each sequence's KV as block tables over an ordered list of tiers (fastest
first), plus a write-combining tail per (sequence, layer) in the compute device's memory.

New tokens go into the tail; a full tail becomes a block, placed by kv/placement.py (the
*prepare* half: which chunk of which tier, and which chunks to demote first) and written by
this store (the *complete* half: the moves' bytes copied in order, then the block). Blocks are
append-only; ``truncate`` rolls a sequence back (a block cut in two is read back into its tail).
The store knows nothing of attention: the tiered backend reads its tables (:meth:`table`) and
sends each tier's worker the blocks to attend.
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.placement import Move, Placement
from kvoffload.kv.tiers.memory import Arena
from kvoffload.kv.tiers.protocol import Tier, TierContext, TierSpec
from kvoffload.kv.tiers.registry import tier_class


def build_tiers(specs: tuple[TierSpec, ...], ctx: TierContext) -> list[Tier]:
    """The tiers of ``specs`` (fastest first), each built by its registered class; a tier with
    a budget of 0 is left out. On an error the tiers already built are closed."""
    tiers: list[Tier] = []
    try:
        for spec in specs:
            cls = tier_class(spec.name)
            if spec.budget != 0:
                tiers.append(cls(spec, ctx))
    except BaseException:
        for t in tiers:
            t.close()
        raise
    return tiers


class BlockStore:
    def __init__(self, tiers: list[Tier], ctx: TierContext, num_layers: int, sink_tokens: int,
                 recent_tokens: int, hot_layers: frozenset[int] = frozenset(),
                 cached_layers: frozenset[int] = frozenset(), tail: BlockLayout | None = None) -> None:
        """tail: the write-combining tails' layout (full precision; default: the blocks')."""
        lay = ctx.layout
        self.tiers, self.ctx, self.layout, self.num_layers = tiers, ctx, lay, num_layers
        self.tail_layout = tail or lay
        self.bs, self.cb = lay.block_size, lay.chunk_blocks
        self.tails = Arena(self.tail_layout, ctx.device, 1, ctx.kv.arena_segment_slots)
        self.placement = Placement(tiers, self.cb, -(-sink_tokens // lay.chunk_tokens) if sink_tokens else 0,
                                   -(-recent_tokens // self.bs), hot_layers, cached_layers)
        self.tail_slot: dict[int, np.ndarray] = {}                 # seq -> [layers] tail slots
        # (seq, layer) -> (placement stamp, tier per block, tier slot per block)
        self._tables: dict[tuple[int, int], tuple[int, np.ndarray, np.ndarray]] = {}
        # (seq, layer) -> (placement stamp, tier per block, location per block: :meth:`locations`)
        self._locs: dict[tuple[int, int], tuple[int, np.ndarray, np.ndarray]] = {}
        self._pending: dict[int, list[tuple[int, torch.Tensor]]] = {}   # tier -> queued (slot, block)

    # ---- sequences ----
    def allocate(self, seq_id: int) -> None:
        self.tail_slot[seq_id] = np.array([self.tails.alloc() for _ in range(self.num_layers)], dtype=np.int64)
        self.placement.add_seq(seq_id, self.num_layers)

    def free(self, seq_id: int) -> None:
        if seq_id not in self.tail_slot:
            return
        for s in self.tail_slot.pop(seq_id):
            self.tails.free(int(s))
        self.placement.remove_seq(seq_id)
        for layer in range(self.num_layers):
            self._tables.pop((seq_id, layer), None)
            self._locs.pop((seq_id, layer), None)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.tail_slot

    def share(self, seq_id: int, source: int, blocks: int) -> None:
        """The first ``blocks`` full blocks of ``source`` become those of ``seq_id`` (which holds
        none, its tails empty): its whole chunks shared (kv/placement.py: referenced by both
        tables, held once), the blocks of a partly shared chunk copied into one of its own."""
        whole = blocks // self.cb * self.cb
        rest = np.arange(whole, blocks, dtype=np.int64)
        for layer in range(self.num_layers):
            self.placement.share(seq_id, source, layer, whole // self.cb)
            if len(rest):
                self.append_slots(seq_id, layer, self.read_blocks(source, layer, rest))

    # ---- where blocks are ----
    def table(self, seq_id: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(tier index, tier slot) of each full block of (seq, layer), in sequence order."""
        stamp = self.placement.stamp.get((seq_id, layer), 0)
        hit = self._tables.get((seq_id, layer))
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        locs = self.placement.tables[seq_id][layer]
        n = self.placement.blocks[seq_id][layer]
        tier = np.array([loc.tier for loc in locs], np.int64)
        base = np.array([loc.chunk for loc in locs], np.int64) * self.cb
        b = np.arange(n, dtype=np.int64)
        c = b // self.cb
        tiers, slots = tier[c], base[c] + b % self.cb
        self._tables[(seq_id, layer)] = (stamp, tiers, slots)
        return tiers, slots

    def locations(self, seq_id: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(tier index ``[n]``, location ``[max(n, 1)]``) of each full block of (seq, layer): its
        tier's :meth:`Tier.locs` (every tier ``direct``), what a native sparse step reads."""
        stamp = self.placement.stamp.get((seq_id, layer), 0)
        hit = self._locs.get((seq_id, layer))
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        tiers, slots = self.table(seq_id, layer)
        locs = np.zeros(max(1, len(slots)), np.int64)
        for t in np.unique(tiers):
            pick = np.nonzero(tiers == t)[0]
            locs[pick] = self.tiers[t].locs(slots[pick])
        self._locs[(seq_id, layer)] = (stamp, tiers, locs)
        return tiers, locs

    def tail_addr(self, seq_id: int, layer: int) -> int:
        return int(self.tails.addrs[self.tail_slot[seq_id][layer]])

    def tail_view(self, seq_id: int, layer: int) -> torch.Tensor:
        """``[slot_elems]``: the (seq, layer)'s write-combining tail."""
        return self.tails.view(int(self.tail_slot[seq_id][layer]))

    # ---- writing ----
    def write(self, seq_id: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v ``[H_kv, L, D]`` (the tails' dtype) at positions ``start ..``: fill the tail,
        whole blocks to their tiers (packed: compressed, for a compressed layout)."""
        lay, bs = self.layout, self.bs
        L, pos, t = k.shape[1], 0, start % bs
        if t:
            n = min(bs - t, L)
            self.tail_layout.write_tokens(self.tail_view(seq_id, layer), t, k[:, :n], v[:, :n])
            pos = n
            if t + n == bs:
                self.flush_tail(seq_id, layer)
        full = (L - pos) // bs
        if full:
            packed = lay.pack(k[:, pos:pos + full * bs], v[:, pos:pos + full * bs])      # [full, slot_elems]
            for i in range(full):
                self._place(seq_id, layer, packed[i])
            pos += full * bs
        if pos < L:
            self.tail_layout.write_tokens(self.tail_view(seq_id, layer), 0, k[:, pos:], v[:, pos:])
        self._write_pending()

    def append_slots(self, seq_id: int, layer: int, slots: torch.Tensor) -> None:
        """Whole blocks ``[n, slot_elems]`` (packed, KV dtype) after the (seq, layer)'s full
        blocks, whose tail must be empty (blocks reused from the persistent store)."""
        for i in range(slots.shape[0]):
            self._place(seq_id, layer, slots[i])
        self._write_pending()

    def flush_tail(self, seq_id: int, layer: int) -> None:
        """The (seq, layer)'s tail is full: it becomes a block (compressed now, if the blocks are)."""
        tail = self.tail_view(seq_id, layer)
        if self.tail_layout is self.layout:
            self._place(seq_id, layer, tail.clone())
        else:
            self._place(seq_id, layer, self.layout.pack(*self.tail_layout.unpack(tail[None]))[0])

    def _place(self, seq_id: int, layer: int, data: torch.Tensor) -> None:
        moves, loc, i = self.placement.place_block(seq_id, layer)
        if moves:
            self._write_pending()              # a demoted chunk is read with every block it holds
            for m in moves:
                self._complete(m)
        self._pending.setdefault(loc.tier, []).append((loc.chunk * self.cb + i, data))

    def _complete(self, m: Move) -> None:
        """Copy a demoted chunk's blocks (read before its slots can be reused)."""
        src = np.arange(m.blocks, dtype=np.int64) + m.src.chunk * self.cb
        data = self.tiers[m.src.tier].read(src)
        self.tiers[m.dst.tier].write(np.arange(m.blocks, dtype=np.int64) + m.dst.chunk * self.cb, data)

    def _write_pending(self) -> None:
        for t, items in self._pending.items():
            self.tiers[t].write(np.array([s for s, _ in items], np.int64), torch.stack([d for _, d in items]))
        self._pending.clear()

    def send(self) -> None:
        """Hand queued block writes on (disk workers write while the model computes)."""
        self._write_pending()
        for t in self.tiers:
            t.flush()

    # ---- reading back ----
    def read_kv(self, seq_id: int, layer: int, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[n, H_kv, bs, D]`` (the tails' dtype) of blocks ``blocks`` of (seq, layer), from
        whatever tier holds them (exact bytes; a compressed block dequantised); a block index
        past the full ones is the tail."""
        tiers, slots = self.table(seq_id, layer)
        tl = self.tail_layout
        shape = (len(blocks), tl.num_kv_heads, self.bs, tl.head_dim)
        K = torch.empty(shape, dtype=self.tails.dtype, device=self.ctx.device)
        V = torch.empty_like(K)
        full = blocks < len(tiers)
        for t in np.unique(tiers[blocks[full]]):
            pick = np.nonzero(full)[0][tiers[blocks[full]] == t]
            at = torch.from_numpy(pick).to(K.device)
            k, v = self.layout.unpack_blocks(self.tiers[int(t)].read(slots[blocks[pick]]))
            K[at], V[at] = k.to(K.dtype), v.to(V.dtype)
        for j in np.nonzero(~full)[0]:
            K[int(j)], V[int(j)] = (x[0] for x in tl.unpack_blocks(self.tail_view(seq_id, layer)[None]))
        return K, V

    def read_blocks(self, seq_id: int, layer: int, blocks: np.ndarray) -> torch.Tensor:
        """``[n, slot_elems]``: the stored bytes (a compressed block as it is) of full blocks
        ``blocks`` of (seq, layer), from whatever tier holds them (the persistent store's copy)."""
        tiers, slots = self.table(seq_id, layer)
        if len(blocks) and int(blocks.max()) >= len(tiers):
            raise ValueError(f"read_blocks: block {int(blocks.max())} of sequence {seq_id} is not full")
        out = None
        for t in np.unique(tiers[blocks]):
            pick = np.nonzero(tiers[blocks] == t)[0]
            data = self.tiers[int(t)].read(slots[blocks[pick]])                      # [len(pick), slot_elems]
            if out is None:
                out = torch.empty((len(blocks), data.shape[1]), dtype=data.dtype, device=data.device)
            out[torch.from_numpy(pick).to(out.device)] = data
        return out

    def prefix(self, seq_id: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[H_kv, length, D]``: the (seq, layer)'s first ``length`` tokens (exact bytes;
        compressed blocks dequantised)."""
        n = -(-length // self.bs)
        return _tokens(*self.read_kv(seq_id, layer, np.arange(n, dtype=np.int64)), length)

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``
        (committed tokens): the blocks holding them are read from their tiers."""
        nl, H_kv, n = index.shape
        idx = index.cpu().numpy()
        bs, D = self.bs, self.layout.head_dim
        dt = self.tails.dtype
        K = torch.empty(nl, H_kv, n, D, dtype=dt, device=self.ctx.device)
        V = torch.empty_like(K)
        for layer in range(nl):
            need = np.unique(idx[layer] // bs)
            k_all, v_all = _tokens(*self.read_kv(seq_id, layer, need))                    # [H_kv, nb*bs, D]
            local = np.searchsorted(need, idx[layer] // bs) * bs + idx[layer] % bs
            li = torch.from_numpy(local).to(self.ctx.device)[..., None].expand(-1, -1, D)
            K[layer], V[layer] = k_all.gather(1, li), v_all.gather(1, li)
        return K, V

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens: later blocks are released; a
        block cut in two is read back into the write-combining tail (which it becomes again)."""
        keep, t = divmod(length, self.bs)
        for layer in range(self.num_layers):
            n = self.placement.blocks[seq_id][layer]
            if t and n > keep:                      # the cut block becomes the tail again (dequantised)
                k, v = self.read_kv(seq_id, layer, np.array([keep]))
                self.tail_layout.write_tokens(self.tail_view(seq_id, layer), 0, k[0], v[0])
            self.placement.drop_from(seq_id, layer, min(n, keep))

    # ---- reporting ----
    def memory_held(self) -> dict[str, int]:
        """Bytes each tier holds now (never more than its budget), plus the tails."""
        held = {t.name: t.bytes_held() for t in self.tiers}
        held["tails"] = self.tails.bytes_held
        return held

    def chunks_per_tier(self) -> dict[str, int]:
        return {t.name: t.used for t in self.tiers}

    def close(self) -> None:
        for t in self.tiers:
            t.close()


def _tokens(k: torch.Tensor, v: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[n, H_kv, bs, D]`` blocks -> ``[H_kv, T, D]`` tokens (T = n*bs, or the first ``length``)."""
    n, H, bs, D = k.shape
    k, v = k.transpose(0, 1).reshape(H, n * bs, D), v.transpose(0, 1).reshape(H, n * bs, D)
    return (k, v) if length is None else (k[:, :length], v[:, :length])
