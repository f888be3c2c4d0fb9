"""Memory tiers — the compute device's memory (``device``) and host RAM (``host``) — with their
in-process attention worker.

Slots live in an :class:`Arena` that grows in fixed segments as chunks are taken, up to the
tier's byte budget, so an unused budget costs no memory. Host segments are pinned when the
compute device is CUDA. Attention runs the native paged kernel on the CPU (one call for every
item of the request), else the PyTorch reference; it runs at ``collect()``, in the backend's
thread, after the slower tiers were sent theirs, so it overlaps their reads.
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload import hugepages
from kvoffload.dtypes import storage_torch_dtype
from kvoffload.kernels import reference
from kvoffload.kernels.paged import Items, PagedAttention, PreparedCall
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    AttendResult,
    ChunkPool,
    TierContext,
    TierCounters,
    TierSpec,
    chunk_capacity,
    expand_rows,
    read_bytes,
)


class Arena:
    """Slots of ``layout`` on one device, handed out ``unit`` consecutive slots at a time (a
    chunk, or one slot for the write-combining tails), in segments of ``segment_units``."""

    def __init__(self, layout: BlockLayout, device: torch.device, unit: int, segment_units: int,
                 capacity: int | None = None, pin: bool = False) -> None:
        self.layout, self.device, self.unit = layout, device, unit
        self.dtype = storage_torch_dtype(layout.dtype)
        self.pool = ChunkPool(capacity)
        self.segment_units, self.pin = segment_units, pin and device.type == "cpu"
        self.segments: list[torch.Tensor] = []                 # each [units * unit, slot_elems]
        self.addrs = np.zeros(0, dtype=np.int64)               # slot -> address
        self._seg_of = np.zeros(0, dtype=np.int64)
        self._row_of = np.zeros(0, dtype=np.int64)

    def alloc(self) -> int:
        u = self.pool.alloc()
        while (u + 1) * self.unit > len(self.addrs):
            self._grow()
        return u

    def free(self, u: int) -> None:
        self.pool.release(u)

    def _grow(self) -> None:
        units = self.segment_units
        cap = self.pool.capacity
        if cap is not None:
            units = max(1, min(units, cap - len(self.addrs) // self.unit))
        n = units * self.unit
        seg = hugepages.zeros((n, self.layout.slot_elems), self.dtype, self.device, self.pin)   # CPU: huge pages
        self.segments.append(seg)
        stride = self.layout.slot_bytes
        self.addrs = np.concatenate([self.addrs, seg.data_ptr() + stride * np.arange(n, dtype=np.int64)])
        self._seg_of = np.concatenate([self._seg_of, np.full(n, len(self.segments) - 1, np.int64)])
        self._row_of = np.concatenate([self._row_of, np.arange(n, dtype=np.int64)])

    @property
    def bytes_held(self) -> int:
        """Memory actually allocated (never more than the budget)."""
        return len(self.addrs) * self.layout.slot_bytes

    def view(self, slot: int) -> torch.Tensor:
        """``[slot_elems]`` view of one slot."""
        return self.segments[self._seg_of[slot]][self._row_of[slot]]

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        """``[n, slot_elems]`` copy of the slots, in the given order."""
        if len(self.segments) == 1:
            return self.segments[0][torch.from_numpy(self._row_of[slots])]
        segs, rows = self._seg_of[slots], self._row_of[slots]
        out = torch.empty(len(slots), self.layout.slot_elems, dtype=self.dtype, device=self.device)
        for s in np.unique(segs):
            at = np.nonzero(segs == s)[0]
            out[torch.from_numpy(at).to(self.device)] = self.segments[s][torch.from_numpy(rows[at]).to(self.device)]
        return out

    def scatter(self, slots: np.ndarray, data: torch.Tensor) -> None:
        """Write ``data`` ``[n, slot_elems]`` into the slots."""
        segs, rows = self._seg_of[slots], self._row_of[slots]
        for s in np.unique(segs):
            at = np.nonzero(segs == s)[0]
            self.segments[s][torch.from_numpy(rows[at]).to(self.device)] = data[torch.from_numpy(at).to(data.device)].to(self.device)


def attend_slots(layout: BlockLayout, kernel: PagedAttention | None, threads: int, q_rows: torch.Tensor,
                 row: np.ndarray, first: np.ndarray, last: np.ndarray, addrs: np.ndarray | None,
                 blocks: torch.Tensor | None, masks: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of items over slots -> (o ``[N, H, D]``, lse ``[N, H]``) fp32.

    q_rows ``[R, H, D]`` fp32; item i attends blocks ``first[i]:first[i+1]`` for row ``row[i]``,
    ``last[i]`` tokens in its last block. Native: ``addrs`` are the blocks' addresses; else
    ``blocks`` ``[n, slot_elems]`` holds their data (the PyTorch reference)."""
    N, (_, H, D) = len(row), q_rows.shape
    if kernel is not None:
        o = torch.empty(N, H, D)
        lse = torch.empty(N, H)
        q = q_rows if q_rows.stride(-1) == 1 and q_rows.stride(-2) == D else q_rows.contiguous()
        kernel(q.numpy(), Items(row, first, last, addrs, masks), o.numpy(), lse.numpy(), threads)
        return o, lse
    k, v = layout.unpack_blocks(blocks)                                               # [n, H_kv, bs, D]
    return reference.attend_items_torch(q_rows.to(k.device), k, v, row, first, last, masks)


def paged_kernel(ctx: TierContext, device: torch.device) -> PagedAttention | None:
    """The native paged kernel for this geometry, or None (CUDA, no compiler, tests asking for
    the reference)."""
    if not ctx.native or device.type != "cpu":
        return None
    return PagedAttention.for_layout(ctx.layout, ctx.group)


class MemoryTier:
    """A tier in memory on ``where`` (the compute device, or the CPU for host RAM)."""

    medium = "memory"
    prefetches = False
    resident = None                 # (direct: nothing to read, every block has its address)
    fetch = None

    @staticmethod
    def chunk_bytes(layout: BlockLayout) -> int:
        """Bytes one chunk takes of the budget (slots back to back)."""
        return layout.chunk_blocks * layout.slot_bytes

    def __init__(self, spec: TierSpec, ctx: TierContext, where: torch.device, pin: bool = False) -> None:
        lay = ctx.layout
        self.name, self.budget, self.ctx = spec.name, spec.budget, ctx
        self.capacity = chunk_capacity(spec, self.chunk_bytes(lay))
        self.arena = Arena(lay, where, lay.chunk_blocks, max(1, ctx.kv.arena_segment_slots // lay.chunk_blocks),
                           self.capacity, pin=pin)
        self.kernel = paged_kernel(ctx, where)
        self.direct = where.type == "cpu"                 # the native kernel reads the arena's addresses
        self.counters = TierCounters()
        self._job: AttendRequest | None = None
        self._prepared: dict = {}                      # request key -> (PreparedCall, bytes read)

    # ---- chunks ----
    def has_room(self) -> bool:
        return self.arena.pool.has_room()

    def alloc(self) -> int:
        return self.arena.alloc()

    def release(self, chunk: int) -> None:
        self.arena.free(chunk)

    @property
    def used(self) -> int:
        return self.arena.pool.used

    # ---- blocks ----
    def write(self, slots: np.ndarray, data: torch.Tensor) -> None:
        self.arena.scatter(slots, data)
        self.counters.written += len(slots) * self.ctx.layout.slot_bytes

    def flush(self) -> None:
        pass

    def read(self, slots: np.ndarray) -> torch.Tensor:
        self.counters.read += len(slots) * self.ctx.layout.slot_bytes
        return self.arena.gather(slots).to(self.ctx.device)

    # ---- attention (computed at collect, in the caller's thread) ----
    def submit(self, req: AttendRequest) -> None:
        self._job = req

    def prefetch(self, req: AttendRequest) -> None:
        pass

    def collect(self) -> AttendResult:
        req, self._job = self._job, None
        lay = self.ctx.layout
        B, L, H, D = req.q.shape
        if req.key is not None and self.kernel is not None:
            return self._collect_prepared(req)
        row, first, idx = expand_rows(req.seq, req.first, L)
        slots = req.slots[idx]
        masks = None if req.masks is None else req.masks[idx]
        last = np.full(len(row), lay.block_size, np.int64)
        q = req.q.reshape(B * L, H, D)
        if self.kernel is not None:
            o, lse = attend_slots(lay, self.kernel, self.ctx.threads, q, row, first, last,
                                  self.arena.addrs[slots], None, masks)
        else:
            o, lse = attend_slots(lay, None, self.ctx.threads, q, row, first, last, None,
                                  self.arena.gather(slots), masks)
        read = read_bytes(lay, len(req.slots), req.masks)
        self.counters.attended(read, len(req.slots))
        N = req.num_items
        return AttendResult(o.view(N, L, H, D), lse.view(N, L, H), read)

    def _collect_prepared(self, req: AttendRequest) -> AttendResult:
        """A request seen before (same key: same items): its kernel call was prepared then."""
        hit = self._prepared.get(req.key)
        if hit is None:
            lay = self.ctx.layout
            L = req.q.shape[1]
            row, first, idx = expand_rows(req.seq, req.first, L)
            items = Items(row, first, np.full(len(row), lay.block_size, np.int64), self.arena.addrs[req.slots[idx]],
                          None if req.masks is None else req.masks[idx])
            if len(self._prepared) >= 4 * 64:                     # a few steps of every layer
                self._prepared.clear()
            hit = self._prepared[req.key] = (PreparedCall(self.kernel, items, self.ctx.threads),
                                              read_bytes(lay, len(req.slots), req.masks))
        call, read = hit
        B, L, H, D = req.q.shape
        call(req.q.reshape(B * L, H, D))
        self.counters.attended(read, len(req.slots))
        N = req.num_items
        return AttendResult(call.part_o[:N * L].reshape(N, L, H, D), call.part_lse[:N * L].reshape(N, L, H), read)

    def locs(self, slots: np.ndarray) -> np.ndarray:
        return self.arena.addrs[slots]

    def bytes_held(self) -> int:
        return self.arena.bytes_held

    def pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


class DeviceTier(MemoryTier):
    """The compute device's memory (on the CPU that is host RAM too: its default budget there is 0)."""

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        super().__init__(spec, ctx, ctx.device)


class HostTier(MemoryTier):
    """Host RAM (pinned when the compute device is CUDA, so copies to it can be asynchronous)."""

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        super().__init__(spec, ctx, torch.device("cpu"), pin=ctx.device.type == "cuda")
