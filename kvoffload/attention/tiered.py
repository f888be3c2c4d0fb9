"""Tiered KV backend: blocks spread over device / host / disk, attention computed where they live.

Per layer of a decode step: the new token's k/v go into the sequence's write-combining tail
(device memory); each tier's worker gets the queries and the list of its blocks, and returns a
partial output with its log-sum-exp; the partials merge exactly (attention/merge.py). Only q
(and k/v of the new token, to the tail's holder) goes in, only (o, lse) comes out: the KV itself
never crosses a tier boundary during attention. A tail that fills up becomes a block, placed
by kv/placement.py (fastest tier with room; old non-sink blocks demote one tier down).

A prefill chunk is attended the same way: the chunk over its own keys (causal) locally, over
the earlier blocks by their workers; then its k/v are packed into blocks and handed to their
tiers (disk writes are sent to the disk processes, which write while the next layer computes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from kvoffload.attention.merge import merge_torch
from kvoffload.attention.ops import attend_lse
from kvoffload.attention.workers.local import (
    MemoryWorker,
    dtype_name,
    pack_slots,
    unpack_slots,
)
from kvoffload.attention.workers.process import ProcessWorker
from kvoffload.attention.workers.protocol import (
    AttendRequest,
    AttendResult,
    WriteBlocks,
)
from kvoffload.config import KVConfig, ModelConfig
from kvoffload.errors import ConfigError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.placement import Level, Loc, Move, Placement, SlotPool
from kvoffload.kv.tiers.memory import MemoryTier
from kvoffload.model.interface import ForwardBatch, Phase
from kvoffload.sparse.base import Selection, SparseCounters, SparsePolicy

DEVICE, HOST, DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class TierCounters:
    """Bytes, cumulative. read: KV read by the tier's worker(s) to attend. written: blocks stored
    into the tier (new or demoted). to_worker / from_worker: request and reply payloads that
    crossed into / out of the tier's worker(s)."""

    read: int = 0
    written: int = 0
    to_worker: int = 0
    from_worker: int = 0


@dataclass
class KVStats:
    tiers: dict[str, TierCounters] = field(default_factory=lambda: {n: TierCounters() for n in TIER_NAMES})
    decode_tokens: int = 0                 # tokens generated (one per sequence per decode step)

    def per_token(self) -> dict[str, dict[str, float]]:
        n = max(1, self.decode_tokens)
        return {t: {k: v / n for k, v in vars(c).items()} for t, c in self.tiers.items()}


def _slots_for(budget: int | None, unit: int, name: str) -> int | None:
    if budget is None:
        return None
    if budget == 0:
        return 0
    if budget < unit:
        raise ConfigError(f"--{name.replace('_', '-')} {budget} bytes is smaller than one KV block ({unit} bytes)")
    return budget // unit


def _as_numpy(q: torch.Tensor) -> np.ndarray:
    """The fp32 queries, as the disk workers' numpy array."""
    return q.detach().cpu().contiguous().numpy()


def _cleanup(workers: list, directory: str | None) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:           # noqa: BLE001 - best effort at exit
            pass
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


class TieredBackend:
    def __init__(self, cfg: ModelConfig, kv: KVConfig, device: torch.device, kv_dtype: torch.dtype,
                 act_dtype: torch.dtype, threads: int, native: bool = True,
                 policy: SparsePolicy | None = None) -> None:
        self.cfg, self.kvcfg, self.device, self.kv_dtype, self.act_dtype = cfg, kv, device, kv_dtype, act_dtype
        self.bs = kv.block_size
        self.layout = lay = BlockLayout(kv.block_size, cfg.num_kv_heads, cfg.head_dim, dtype_name(kv_dtype))
        dev_budget = kv.kv_device_budget if kv.kv_device_budget is not None else (None if device.type == "cuda" else 0)
        caps = [_slots_for(dev_budget, lay.slot_bytes, "kv_device_budget"),
                _slots_for(kv.kv_host_budget, lay.slot_bytes, "kv_host_budget"),
                _slots_for(kv.kv_disk_budget, lay.disk_stride, "kv_disk_budget")]
        seg = kv.arena_segment_slots
        cpu = torch.device("cpu")
        self.tails = MemoryTier("tails", lay, kv_dtype, device, None, seg)
        self.tiers = [MemoryTier("device", lay, kv_dtype, device, caps[DEVICE], seg),
                      MemoryTier("host", lay, kv_dtype, cpu, caps[HOST], seg, pin=device.type == "cuda")]
        levels = [Level("device", [self.tiers[DEVICE]], caps[DEVICE]), Level("host", [self.tiers[HOST]], caps[HOST])]
        self.workers: list = [MemoryWorker(self.tiers[DEVICE], threads, tails=self.tails, native=native),
                              MemoryWorker(self.tiers[HOST], threads, native=native,
                                           tails=self.tails if device.type == "cpu" else None)]
        self.disk: list[ProcessWorker] = []
        self.directory: str | None = None
        self._finalizer = weakref.finalize(self, _cleanup, self.workers, None)
        if caps[DISK] != 0:
            self.directory = self._make_dir(kv)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self.workers, self.directory)
            # the disks bound these workers: their kernels share the cores (OpenMP teams that
            # outnumber the cores stall each other at every barrier)
            per_worker = max(1, threads // kv.disk_workers)
            for i in range(kv.disk_workers):
                self.disk.append(ProcessWorker(os.path.join(self.directory, f"shard-{i}.kv"), lay, per_worker,
                                               kv.disk_read_batch, kv.disk_read_ahead, kv.disk_write_backlog))
                self.workers.append(self.disk[-1])
            levels.append(Level("disk", [SlotPool(None) for _ in self.disk], caps[DISK]))
        self.placement = Placement(levels, -(-kv.kv_sink_tokens // self.bs), -(-kv.kv_recent_tokens // self.bs))
        self.tail_slot: dict[int, np.ndarray] = {}                 # seq -> [layers] tail slots
        # (seq, layer) -> (placement stamp, [n, 3] block table rows, their per-worker slots)
        self._split_cache: dict[tuple[int, int], tuple[int, np.ndarray, dict[tuple[int, int], np.ndarray]]] = {}
        self._writes: dict[int, list[tuple[int, bytes]]] = {}      # disk shard -> pending (slot, data)
        # seq -> (start, per layer (k, v) [H_kv, L, D]) of its last verify pass, until commit
        self._staged: dict[int, tuple[int, list]] = {}
        self.stats = KVStats()
        self.policy = policy                 # sparse decode: which blocks each step reads
        self.sparse_stats = SparseCounters()
        # decode micro-batches call in from several threads: one at a time in here (their model
        # compute outside overlaps); workers, placement and counters are not shared otherwise
        self._lock = threading.Lock()

    @staticmethod
    def _make_dir(kv: KVConfig) -> str:
        base = kv.offload_dir or tempfile.gettempdir()
        if not os.path.isdir(base):
            raise ConfigError(f"offload directory {base} does not exist")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ConfigError(f"offload directory {base} is not writable")
        free = shutil.disk_usage(base).free
        if kv.kv_disk_budget is not None and kv.kv_disk_budget > free:
            raise ConfigError(f"--kv-disk-budget {kv.kv_disk_budget} bytes exceeds the {free} bytes free in {base}")
        try:
            return tempfile.mkdtemp(prefix="kvoffload-", dir=base)
        except OSError as e:
            raise ConfigError(f"cannot create a directory in {base}: {e.strerror}") from None

    def close(self) -> None:
        """Stop the workers and remove the offload directory (also done at exit)."""
        self._finalizer()

    # ---- sequence lifecycle ----
    def allocate(self, seq_id: int, capacity: int) -> None:
        self.tail_slot[seq_id] = np.array([self.tails.alloc() for _ in range(self.cfg.num_layers)], dtype=np.int64)
        self.placement.add_seq(seq_id, self.cfg.num_layers)
        if self.policy is not None:
            self.policy.allocate(seq_id, capacity)

    def free(self, seq_id: int) -> None:
        if seq_id not in self.tail_slot:
            return
        for s in self.tail_slot.pop(seq_id):
            self.tails.free(int(s))
        self.placement.remove_seq(seq_id)
        for layer in range(self.cfg.num_layers):
            self._split_cache.pop((seq_id, layer), None)
        self._staged.pop(seq_id, None)
        if self.policy is not None:
            self.policy.free(seq_id)

    # ---- where blocks are ----
    def _split(self, seq_id: int, layer: int) -> dict[tuple[int, int], np.ndarray]:
        """(level, shard) -> slots of this (sequence, layer)'s blocks there (cached until they move)."""
        return self._table(seq_id, layer)[1]

    def _table(self, seq_id: int, layer: int) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
        """The block table as ``[n, 3]`` (level, shard, slot) rows and its :meth:`_split`."""
        stamp = self.placement.stamp.get((seq_id, layer), 0)
        hit = self._split_cache.get((seq_id, layer))
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        locs = self.placement.tables[seq_id][layer]
        a = np.array([(loc.level, loc.shard, loc.slot) for loc in locs], dtype=np.int64).reshape(-1, 3)
        groups = {where: a[rows, 2] for where, rows in self._by_worker(a).items()}
        self._split_cache[(seq_id, layer)] = (stamp, a, groups)
        return a, groups

    @staticmethod
    def _by_worker(rows: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        """``[n, 3]`` (level, shard, slot) rows -> (level, shard) -> bool row selector."""
        key = rows[:, 0] * 1_000_000 + rows[:, 1]
        return {(int(k // 1_000_000), int(k % 1_000_000)): key == k for k in np.unique(key)}

    def _chosen_split(self, seq_id: int, layer: int, sel: Selection,
                      ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """(level, shard) -> (slots, ``[n, H_kv]`` token masks) of the blocks a selection names."""
        blocks, masks = sel.union(self.bs)
        rows = self._table(seq_id, layer)[0][blocks]                        # [n, 3]
        return {where: (rows[pick, 2], masks[pick]) for where, pick in self._by_worker(rows).items()}

    # ---- attention ----
    def _dispatch(self, layer: int, batch: ForwardBatch, q: torch.Tensor, tail_lens: np.ndarray,
                  k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                  chosen: list[Selection] | None = None) -> list[AttendResult]:
        """Send q (``[B, L, H, D]``, fp32) to every worker holding blocks: the disk workers
        start first (separate processes), then the memory tiers are attended in this thread
        while the disks read; returns their results. The tails' bytes count with the tier
        whose worker attends them (the host's on the CPU, where the device has no blocks).
        ``chosen``: sparse decode, per sequence the blocks (and tokens) to attend; the workers
        get only those, with their token masks."""
        ids = batch.seq_ids
        if chosen is None:
            splits = [self._split(sid, layer) for sid in ids]
            masks = None
        else:
            picked = [self._chosen_split(sid, layer, sel) for sid, sel in zip(ids, chosen)]
            splits = [{k: v[0] for k, v in p.items()} for p in picked]
            masks = [{k: v[1] for k, v in p.items()} for p in picked]
        empty_masks = np.zeros((0, self.cfg.num_kv_heads), np.uint64)

        def masks_of(key):
            return None if masks is None else [m.get(key, empty_masks) for m in masks]

        active: list[tuple[int, object, AttendRequest]] = []
        q_np = None
        for shard, w in enumerate(self.disk):
            blocks = [sp.get((DISK, shard), _EMPTY) for sp in splits]
            if any(len(b) for b in blocks):
                q_np = _as_numpy(q) if q_np is None else q_np
                active.append((DISK, w, AttendRequest(layer, ids, blocks, q_np, masks=masks_of((DISK, shard)))))
        tails = np.array([self.tail_slot[sid][layer] for sid in ids], dtype=np.int64)
        tail = (tails, tail_lens, k_new, v_new)
        need_tail = k_new is not None or bool(tail_lens.any())
        dev_blocks = [sp.get((DEVICE, 0), _EMPTY) for sp in splits]
        host_blocks = [sp.get((HOST, 0), _EMPTY) for sp in splits]
        dev_has, host_has = any(len(b) for b in dev_blocks), any(len(b) for b in host_blocks)
        # on the CPU the tails are in RAM too: with no device blocks, the host worker takes them (one call)
        tails_on_host = need_tail and self.device.type == "cpu" and not dev_has
        if host_has or tails_on_host:
            active.append((HOST, self.workers[HOST],
                           AttendRequest(layer, ids, host_blocks, q.to("cpu"), *(tail if tails_on_host else (None,) * 4),
                                         masks=masks_of((HOST, 0)))))
        if dev_has or (need_tail and not tails_on_host):
            active.append((DEVICE, self.workers[DEVICE], AttendRequest(layer, ids, dev_blocks, q, *tail,
                                                                       masks=masks_of((DEVICE, 0)))))
        if not self.kvcfg.kv_serial:
            for _, w, req in active:
                w.submit(req)
        if batch.phase is not Phase.PREFILL and layer + 1 < self.cfg.num_layers and self.kvcfg.disk_read_ahead \
                and not self.kvcfg.kv_serial and (self.policy is None or not self.policy.sparse(layer + 1)):
            # decode / verify: the next layer's blocks are known now, its query is not; let the disks read
            nxt = [self._split(sid, layer + 1) for sid in ids]
            for shard, w in enumerate(self.disk):
                blocks = [sp.get((DISK, shard), _EMPTY) for sp in nxt]
                if any(len(b) for b in blocks):
                    w.prefetch(blocks)
        results = []
        for level, w, req in reversed(active):          # the device's own first: it runs right here
            if self.kvcfg.kv_serial:
                w.submit(req)
            r = w.collect()
            c = self.stats.tiers[TIER_NAMES[level]]
            c.read += r.bytes_read
            if level != DEVICE:                          # what crossed to / from that tier
                c.to_worker += r.bytes_in
                c.from_worker += r.bytes_out
            results.append(r)
        return results

    def _merged(self, results: list[AttendResult], extra=None) -> torch.Tensor:
        """Merge the workers' ``[B, L, H, D]`` partials (and ``extra``) -> o fp32 on the device."""
        parts = [(torch.as_tensor(r.o).to(self.device), torch.as_tensor(r.lse).to(self.device)) for r in results]
        if extra is not None:
            parts.append(extra)
        return merge_torch(parts)[0]

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, 1, D]``, k/v ``[B, H_kv, 1, D]`` -> ``[B, 1, H, D]``."""
        with self._lock:
            return self._decode(layer, q, k, v, batch)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        kvd = self.kv_dtype
        qk = q.transpose(1, 2).float()                                         # [B, 1, H, D] fp32
        tail_lens = np.array([s % self.bs for s in batch.starts], dtype=np.int64)
        chosen = None
        if self.policy is not None and self.policy.sparse(layer):
            chosen = []
            for b, (sid, s) in enumerate(zip(batch.seq_ids, batch.starts)):
                self.policy.append(layer, sid, s, k[b].to(kvd), v[b].to(kvd))
                chosen.append(self.policy.select(layer, sid, q[b, :, 0], s + 1))
        results = self._dispatch(layer, batch, qk, tail_lens, k[:, :, 0].to(kvd), v[:, :, 0].to(kvd), chosen)
        o = self._merged(results)                                              # [B, 1, H, D]
        if chosen is not None:
            o = self._corrected(o, chosen, batch)
        for sid, s in zip(batch.seq_ids, batch.starts):
            if (s + 1) % self.bs == 0:                                          # the tail is full
                self._flush(sid, layer)
        self._send_writes()
        if layer == self.cfg.num_layers - 1:
            self.stats.decode_tokens += len(batch.seq_ids)
        return o.to(q.dtype)

    def _corrected(self, o: torch.Tensor, chosen: list[Selection], batch: ForwardBatch) -> torch.Tensor:
        """SparF's ``alpha * o + (1 - alpha) * mean(V)`` where a selection asks for it; counts
        what the selections read. o ``[B, 1, H, D]``."""
        for b, (sel, s) in enumerate(zip(chosen, batch.starts)):
            self.sparse_stats.add(sel, s + 1, self.bs, self.layout.token_bytes(1) // self.cfg.num_kv_heads)
            o[b, 0] = sel.corrected(o[b, 0])                                       # [H, D]
        return o

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``."""
        outs = []
        for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
            kb, vb = k[b].to(self.kv_dtype), v[b].to(self.kv_dtype)            # as stored: [H_kv, L, D]
            o_c, lse_c = attend_lse(q[b], kb, vb, causal=True)                 # [H, L, D], [H, L]
            own = (o_c.transpose(0, 1)[None], lse_c.transpose(0, 1)[None])     # [1, L, H, D], [1, L, H]
            if start > 0:
                one = ForwardBatch(batch.phase, (sid,), batch.positions[b:b + 1], (start,), batch.logits)
                qk = q[b:b + 1].transpose(1, 2).float()                         # [1, L, H, D] fp32
                results = self._dispatch(layer, one, qk, np.array([start % self.bs], dtype=np.int64))
                o = self._merged(results, own)
            else:
                o = own[0]
            outs.append(o[0].to(q.dtype))                                      # [L, H, D]
            self._write_chunk(sid, layer, start, kb, vb)
            if self.policy is not None:
                self.policy.append(layer, sid, start, kb, vb)
        self._send_writes()
        return torch.stack(outs)

    # ---- speculation: verify, commit / rollback, reading KV back ----
    def verify(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q ``[B, H, L, D]``, k/v ``[B, H_kv, L, D]`` -> ``[B, L, H, D]``: every sequence's L
        tokens over its committed KV (one request per worker for the whole batch: the workers
        take an L-token query block) merged with the tokens over each other (causal, here).
        Their k/v are staged in memory, not written, until :meth:`commit`."""
        with self._lock:
            kb, vb = k.to(self.kv_dtype), v.to(self.kv_dtype)                     # as stored: [B, H_kv, L, D]
            tail_lens = np.array([s % self.bs for s in batch.starts], dtype=np.int64)
            results = self._dispatch(layer, batch, q.transpose(1, 2).float(), tail_lens)
            own = [attend_lse(q[b], kb[b], vb[b], causal=True) for b in range(len(batch.seq_ids))]
            own_o = torch.stack([o.transpose(0, 1) for o, _ in own])             # [B, L, H, D]
            own_lse = torch.stack([lse.transpose(0, 1) for _, lse in own])       # [B, L, H]
            o = self._merged(results, (own_o, own_lse))
            for b, (sid, start) in enumerate(zip(batch.seq_ids, batch.starts)):
                staged = self._staged.setdefault(sid, (start, [None] * self.cfg.num_layers))
                staged[1][layer] = (kb[b], vb[b])
            return o.to(q.dtype)

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
                self._write_chunk(seq_id, layer, start, kb[:, :n], vb[:, :n])
                if self.policy is not None:
                    self.policy.append(layer, seq_id, start, kb[:, :n], vb[:, :n])
            self._send_writes()
            self.stats.decode_tokens += n

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll the sequence back to its first ``length`` tokens: later blocks are released; a
        block cut in two is read back into the write-combining tail (which it becomes again)."""
        with self._lock:
            if self.policy is not None:
                raise ConfigError("truncating a sequence is not supported with a sparse policy (its metadata is append-only)")
            self._staged.pop(seq_id, None)
            keep, t = divmod(length, self.bs)
            for layer in range(self.cfg.num_layers):
                locs = self.placement.tables[seq_id][layer]
                if t and len(locs) > keep:                 # the cut block becomes the tail again
                    self.tails.view(int(self.tail_slot[seq_id][layer])).copy_(self._block(locs[keep]))
                self.placement.drop_from(seq_id, layer, keep)

    def _block(self, loc: Loc) -> torch.Tensor:
        """One stored block's ``[slot_elems]`` data (read from its disk shard if it is there)."""
        if loc.level == DISK:
            return self._read_disk(loc.shard, np.array([loc.slot], dtype=np.int64))[0]
        return self.tiers[loc.level].view(loc.slot)

    def _read_disk(self, shard: int, slots: np.ndarray) -> torch.Tensor:
        """``[n, slot_elems]``: the slots' data, read by their disk worker."""
        raw = self.disk[shard].read(slots)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(self.kv_dtype).view(len(slots), -1).to(self.device)

    def gather(self, seq_id: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ``[layers, H_kv, n, D]`` at token positions ``index`` ``[layers, H_kv, n]``
        (committed tokens): the blocks holding them are read from their tiers, each disk shard
        once for all layers; the bytes count as that tier's reads."""
        with self._lock:
            nl, H_kv, n = index.shape
            idx = index.cpu().numpy()
            bs = self.bs
            need = [np.unique(idx[layer] // bs) for layer in range(nl)]          # blocks per layer
            slots: dict[tuple[int, int], list[int]] = {}                          # where -> slots
            where_of: list[list[tuple[tuple[int, int], int]]] = []
            for layer in range(nl):
                rows = self._table(seq_id, layer)[0]
                out = []
                for blk in need[layer]:
                    if blk < len(rows):
                        lv, shard, slot = (int(x) for x in rows[blk])
                    else:                                                          # the partial tail
                        lv, shard, slot = -1, 0, int(self.tail_slot[seq_id][layer])
                    out.append(((lv, shard), len(slots.setdefault((lv, shard), []))))
                    slots[(lv, shard)].append(slot)
                where_of.append(out)
            data: dict[tuple[int, int], torch.Tensor] = {}
            for (lv, shard), sl in slots.items():
                arr = np.asarray(sl, dtype=np.int64)
                if lv == DISK:
                    data[(lv, shard)] = self._read_disk(shard, arr)
                else:
                    tier = self.tails if lv < 0 else self.tiers[lv]
                    data[(lv, shard)] = tier.gather(arr).to(self.device)
                if lv >= 0:
                    self.stats.tiers[TIER_NAMES[lv]].read += len(arr) * self.layout.slot_bytes
            D = self.cfg.head_dim
            K = torch.empty(nl, H_kv, n, D, dtype=self.kv_dtype, device=self.device)
            V = torch.empty_like(K)
            for layer in range(nl):
                packed = torch.stack([data[w][i] for w, i in where_of[layer]])        # [nb, slot_elems]
                k_all, v_all = unpack_slots(packed, H_kv, D, bs)                      # [H_kv, nb*bs, D]
                local = np.searchsorted(need[layer], idx[layer] // bs) * bs + idx[layer] % bs
                li = torch.from_numpy(local).to(self.device)[..., None].expand(-1, -1, D)
                K[layer], V[layer] = k_all.gather(1, li), v_all.gather(1, li)
            return K, V

    # ---- writing blocks ----
    def _tail_views(self, sid: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail's K ``[H_kv, D/2, bs, 2]`` and V ``[H_kv, bs, D]`` views."""
        view = self.tails.view(int(self.tail_slot[sid][layer]))
        half = self.layout.num_kv_heads * self.layout.head_elems
        H_kv, D = self.layout.num_kv_heads, self.layout.head_dim
        return view[:half].view(H_kv, D // 2, self.bs, 2), view[half:].view(H_kv, self.bs, D)

    @staticmethod
    def _k_pairs(k: torch.Tensor) -> torch.Tensor:
        """k ``[H_kv, n, D]`` -> ``[H_kv, D/2, n, 2]`` (the tail's K order)."""
        H_kv, n, D = k.shape
        return k.reshape(H_kv, n, D // 2, 2).transpose(1, 2)

    def _write_chunk(self, sid: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v ``[H_kv, L, D]`` at positions ``start..``: fill the tail, whole blocks to their tiers."""
        k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        L, pos, t = k.shape[1], 0, start % self.bs
        if t:
            n = min(self.bs - t, L)
            tk, tv = self._tail_views(sid, layer)
            tk[:, :, t:t + n] = self._k_pairs(k[:, :n])
            tv[:, t:t + n] = v[:, :n]
            pos = n
            if t + n == self.bs:
                self._flush(sid, layer)
        full = (L - pos) // self.bs
        if full:
            packed = pack_slots(k[:, pos:pos + full * self.bs], v[:, pos:pos + full * self.bs], self.bs)
            for i in range(full):
                self._place(sid, layer, packed[i])
            pos += full * self.bs
        if pos < L:
            tk, tv = self._tail_views(sid, layer)
            tk[:, :, :L - pos] = self._k_pairs(k[:, pos:])
            tv[:, :L - pos] = v[:, pos:]

    def _flush(self, sid: int, layer: int) -> None:
        self._place(sid, layer, self.tails.view(int(self.tail_slot[sid][layer])))

    def _place(self, sid: int, layer: int, data: torch.Tensor) -> None:
        """Prepare (placement decides, maybe demoting others) then complete every move in order."""
        for m in self.placement.place_new(sid, layer):
            self._complete(m, data if m.src is None else self.tiers[m.src.level].view(m.src.slot))

    def _complete(self, m: Move, data: torch.Tensor) -> None:
        dst: Loc = m.dst
        self.stats.tiers[TIER_NAMES[dst.level]].written += self.layout.slot_bytes
        if dst.level == DISK:
            raw = data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            self._writes.setdefault(dst.shard, []).append((dst.slot, raw))
        else:
            self.tiers[dst.level].view(dst.slot).copy_(data)

    def _send_writes(self) -> None:
        """Hand the batched whole blocks to their disk workers (they write while we compute)."""
        for shard, items in self._writes.items():
            slots = np.array([s for s, _ in items], dtype=np.int64)
            self.disk[shard].write(WriteBlocks(slots, b"".join(d for _, d in items)))
        self._writes.clear()

    # ---- reporting ----
    def memory_held(self) -> dict[str, int]:
        """Bytes each memory tier holds now (never more than its budget), plus the tails."""
        return {"device": self.tiers[DEVICE].bytes_held, "host": self.tiers[HOST].bytes_held,
                "tails": self.tails.bytes_held,
                "disk": sum(lv.used for lv in self.placement.levels[DISK:]) * self.layout.disk_stride}

    def blocks_per_tier(self) -> dict[str, int]:
        return {TIER_NAMES[i]: lv.used for i, lv in enumerate(self.placement.levels)}
