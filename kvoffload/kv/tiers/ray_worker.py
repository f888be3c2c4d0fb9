"""What runs inside a ray tier actor (kv/tiers/ray.py starts them): one KV shard — its blocks in
the actor's RAM, or in a private file on its node's disk — and the attention over it.

Lamina's attention worker: a request brings the queries of the batch rows that have items here
and the items (chunks) to attend; the reply is one (o, lse) per item, or, with ``merge``, the
items of each batch row merged here into one (o, lse) — then only ``2 x rows x L x H x (D + 1)``
fp32 values come back whatever the context length. This module imports numpy, the native
kernels' binding and the disk worker's shard, never torch or ray (the actor class is wrapped
by ``ray.remote`` on the driver), so an actor starts fast and a test can run it in-process.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import weakref

import numpy as np

from kvoffload.kernels import reference
from kvoffload.kernels.paged import Items, PagedAttention, merge_parts
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk_worker import DiskWorkerServer, WorkerIO, WriteBlocks
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    AttendResult,
    expand_rows,
    read_bytes,
)
from kvoffload.kv.tiers.shards import from_runs

STORAGES = ("memory", "disk")


class MemoryShard:
    """Slots in RAM, in segments of ``segment_slots`` slots grown as higher slots are written (so
    an actor holds what it was given, never its whole budget up front)."""

    def __init__(self, layout: BlockLayout, segment_slots: int) -> None:
        self.layout, self.per = layout, max(1, segment_slots)
        self.segments: list[np.ndarray] = []                     # each [per, slot_bytes] uint8

    def _grow(self, slots: np.ndarray) -> None:
        need = int(slots.max()) // self.per + 1 if len(slots) else 0
        while len(self.segments) < need:
            self.segments.append(np.zeros((self.per, self.layout.slot_bytes), np.uint8))

    def write(self, slots: np.ndarray, data: np.ndarray) -> None:
        """``data`` ``[n, slot_bytes]`` uint8 into ``slots``."""
        self._grow(slots)
        seg, row = np.divmod(slots, self.per)
        for s in np.unique(seg):
            at = seg == s
            self.segments[s][row[at]] = data[at]

    def addrs(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's address (for the native kernel)."""
        base = np.array([s.ctypes.data for s in self.segments], np.int64)
        seg, row = np.divmod(slots, self.per)
        return base[seg] + row * self.layout.slot_bytes

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """``[n, slot_bytes]`` uint8 copy of the slots, in the given order."""
        out = np.empty((len(slots), self.layout.slot_bytes), np.uint8)
        seg, row = np.divmod(slots, self.per)
        for s in np.unique(seg):
            at = seg == s
            out[at] = self.segments[s][row[at]]
        return out

    @property
    def bytes_held(self) -> int:
        return len(self.segments) * self.per * self.layout.slot_bytes

    def close(self) -> None:
        self.segments.clear()


def merge_rows(seq: np.ndarray, o: np.ndarray, lse: np.ndarray, threads: int = 1, native: bool = True):
    """Items' partials -> one partial per batch row: (the first item of each row in request
    order ``[R]``, o ``[R, L, H, D]``, lse ``[R, L, H]``); a row's items merge in request order
    (which is sequence order) through the one merge function every merge uses."""
    N, L, H, D = o.shape
    rows, inv = np.unique(seq, return_inverse=True)
    R = len(rows)
    by_row = np.argsort(inv, kind="stable")                             # items grouped by row, in order
    counts = np.bincount(inv, minlength=R)
    starts = np.zeros(R, np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    row_first = np.zeros(R * L + 1, np.int64)                          # merged row (r, l) = r * L + l
    np.cumsum(np.repeat(counts, L), out=row_first[1:])
    r = inv[by_row]
    j = np.arange(N) - starts[r]
    order = np.empty(N * L, np.int64)
    for l in range(L):
        order[row_first[r * L + l] + j] = by_row * L + l
    part_o = np.ascontiguousarray(o.reshape(N * L, H, D), np.float32)
    part_lse = np.ascontiguousarray(lse.reshape(N * L, H), np.float32)
    out, out_lse = None, None
    if native:
        out = np.empty((R * L, H, D), np.float32)
        out_lse = np.empty((R * L, H), np.float32)
        try:
            merge_parts(row_first, order, part_o, part_lse, out, out_lse, threads)
        except RuntimeError:                                            # no native kernels here
            out = None
    if out is None:
        out, out_lse = reference.merge_parts(row_first, order, part_o, part_lse)
    return by_row[starts], out.reshape(R, L, H, D), out_lse.reshape(R, L, H)


class ShardServer:
    """One shard and its attention; the methods are the actor's (kv/tiers/ray.py)."""

    def __init__(self, layout: dict, group: int, threads: int, storage: str, segment_slots: int,
                 io: dict, native: bool = True, directory: str | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"unknown ray shard storage {storage!r} (choose from {', '.join(STORAGES)})")
        self.layout = lay = BlockLayout(**layout)
        self.threads, self.native, self.storage = threads, native, storage
        self.directory = None
        if storage == "disk":       # a private directory on this node, removed when the actor closes
            self.directory = tempfile.mkdtemp(prefix="kvoffload-ray-", dir=directory)
            self._remove = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
            self.disk = DiskWorkerServer(os.path.join(self.directory, "shard.kv"), lay, group, threads,
                                         WorkerIO(**io), native)
        else:
            self.mem = MemoryShard(lay, segment_slots)
            self.kernel = PagedAttention.for_layout(lay, group) if native else None

    def where(self) -> dict:
        """Where this actor runs (for messages naming a node)."""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:           # noqa: BLE001 - in-process (tests): no node
            node = ""
        return {"node": node, "host": socket.gethostname(), "ip": _ip(), "pid": os.getpid()}

    def write(self, slots: np.ndarray, data: np.ndarray) -> int:
        """Whole blocks: ``data`` ``[n, slot_bytes]`` uint8 into the shard's ``slots``; returns n."""
        slots = np.asarray(slots, np.int64)
        if self.storage == "disk":
            self.disk.write(WriteBlocks(slots, np.ascontiguousarray(data).tobytes()))
        else:
            self.mem.write(slots, data)
        return len(slots)

    def read(self, slots: np.ndarray) -> np.ndarray:
        """``[n, slot_bytes]`` uint8: the slots' bytes, in the given order."""
        slots = np.asarray(slots, np.int64)
        if self.storage == "disk":
            return np.frombuffer(self.disk.read(slots), np.uint8).reshape(len(slots), self.layout.slot_bytes)
        return self.mem.gather(slots)

    def attend(self, req: AttendRequest, merge: bool, runs: np.ndarray | None = None) -> tuple:
        """-> (None, o ``[N, L, H, D]``, lse ``[N, L, H]``, bytes read) or, with ``merge``, (each
        row's first item ``[R]``, o ``[R, L, H, D]``, lse ``[R, L, H]``, bytes read). ``runs``:
        the items' first slots, when ``req.slots`` was left out (each item's slots consecutive)."""
        if runs is not None:
            req.slots = from_runs(req.first, runs)
        r = self.disk.attend(req) if self.storage == "disk" else self._attend_memory(req)
        if not merge:
            return None, r.o, r.lse, r.bytes_read
        first, o, lse = merge_rows(req.seq, r.o, r.lse, self.threads, self.native)
        return first, o, lse, r.bytes_read

    def _attend_memory(self, req: AttendRequest) -> AttendResult:
        lay = self.layout
        q = np.ascontiguousarray(req.q, np.float32)                                # [B, L, H, D]
        B, L, H, D = q.shape
        N = req.num_items
        row, first, idx = expand_rows(req.seq, req.first, L)
        slots = np.asarray(req.slots, np.int64)[idx]
        masks = None if req.masks is None else req.masks[idx]
        last = np.full(len(row), lay.block_size, np.int64)
        q_rows = q.reshape(B * L, H, D)
        if self.kernel is not None:
            o = np.empty((N * L, H, D), np.float32)
            lse = np.empty((N * L, H), np.float32)
            self.kernel(q_rows, Items(row, first, last, self.mem.addrs(slots), masks), o, lse, self.threads)
        else:
            k, v = lay.unpack_f32(self.mem.gather(slots).view(lay.storage))        # [n, H_kv, bs, D] fp32
            o, lse = reference.attend_items(q_rows, k, v, row, first, last, masks)
        return AttendResult(o.reshape(N, L, H, D), lse.reshape(N, L, H), read_bytes(lay, len(req.slots), req.masks))

    def held(self) -> int:
        """Bytes of KV this shard holds (RAM, or its file's extent)."""
        if self.storage == "disk":
            return self.disk.shard.extent() * self.layout.disk_stride
        return self.mem.bytes_held

    def close(self) -> None:
        if self.storage == "disk":
            self.disk.close()
            self._remove()
        else:
            self.mem.close()


def _ip() -> str:
    """This node's address as Ray reports it, else the host's."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:               # noqa: BLE001 - in-process (tests)
        return socket.gethostname()
