"""The disk tier's worker process — the emulated computational-storage engine of InstInfer. It
owns one shard file of aligned slots (``BlockLayout.disk_stride``); a request brings the
queries and the items to attend; the worker reads their blocks (aligned, O_DIRECT) in batches,
attends each batch while the next is read, and sends back only the items' partial outputs and
their log-sum-exps.

This module runs inside the worker (an isolated interpreter, ``python -I``, started by
kv/tiers/disk.py, which calls :func:`main`): it imports numpy and the native kernel's binding,
never torch. Its state is its file: the main
process keeps the block tables and every write the worker has not acknowledged, so a worker
that dies is restarted from its file and the lost request replayed (kv/tiers/disk.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from kvoffload.errors import KvoffloadError
from kvoffload.kernels import reference
from kvoffload.kernels.aio import CAPACITY as AIO_CAPACITY
from kvoffload.kernels.aio import AioError, AioReader
from kvoffload.kernels.paged import Items, PagedAttention
from kvoffload.kv.layout import PAGE, BlockLayout
from kvoffload.kv.tiers.protocol import AttendRequest, AttendResult, expand_rows

IO_BYTES = 1 << 20       # bytes per read (longer runs are cut)
# Reads in flight, by default: about IO_INFLIGHT bytes, between 2 and 16 reads. From two virtual
# disks' `kvoffload bench disk` (random O_DIRECT reads, benchmarks/disk/README.md): 1 MiB reads
# peak at 1-2 in flight (one disk lost 30% at 16), 192 KiB ones gain up to 16, 12-48 KiB ones
# need 16 (12 KiB: 0.2 GB/s at 1, 0.55 at 16).
IO_INFLIGHT = 2 << 20
IO_DEPTH_MIN, IO_DEPTH_MAX = 2, 16
READERS = ("auto", "aio", "threads")


@dataclass(frozen=True)
class WorkerIO:
    """How a disk worker reads (from KVConfig's ``disk_*`` fields).

    batch_bytes: bytes per read batch (two buffers: one is read while the other is attended).
    ahead_bytes: the most a read-ahead buffer holds of the next request's blocks (two
        buffers, grown as hints need; 0 = no read-ahead).
    read_blocks: chosen blocks are read in aligned groups of this many slots (1 = exactly).
    io_depth: reads in flight (0 = through AIO a batch's reads at once, up to the handle's
        capacity; through threads by request size: about ``IO_INFLIGHT`` bytes, 2 to 16).
    io_bytes: the longest single read (longer runs of slots are cut).
    reader: ``aio`` (Linux native AIO: one call queues a batch's reads, one waits; no reader
        threads), ``threads`` (a pool of ``preadv`` threads as deep as the reads in flight), or
        ``auto`` (aio on an O_DIRECT file where the kernel allows it, else threads).
    cache_bytes: RAM for the blocks sparse attends read, kept for the next steps
        (:class:`BlockCache`; 0 = none).
    """

    batch_bytes: int = 1 << 20
    ahead_bytes: int = 0
    read_blocks: int = 1
    io_depth: int = 0
    io_bytes: int = IO_BYTES
    reader: str = "auto"
    cache_bytes: int = 0

    def depth(self, mean_bytes: float) -> int:
        """Reads in flight for requests of this mean size (the thread-pool reader)."""
        if self.io_depth:
            return self.io_depth
        return int(min(IO_DEPTH_MAX, max(IO_DEPTH_MIN, IO_INFLIGHT // max(1.0, mean_bytes))))


class DiskIOError(KvoffloadError):
    """A disk read or write failed (message names the file and the cause)."""


@dataclass
class WriteBlocks:
    """Whole blocks for a worker's shard: ``data`` holds ``len(slots)`` slots back to back."""

    slots: np.ndarray
    data: bytes


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what O_DIRECT needs)."""
    return mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE))


def direct_io_at(directory: str, align: int) -> bool:
    """Whether O_DIRECT reads and writes of ``align`` bytes at an ``align``-aligned offset work in
    ``directory`` (the filesystem's direct-I/O alignment is at most ``align``): a probe file is
    written, read back and removed."""
    if align % PAGE == 0:
        return True
    path = os.path.join(directory, f".dio-probe.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError:
        return False
    buf = aligned_buffer(PAGE)
    try:
        view = memoryview(buf)[:align]
        return os.pwrite(fd, view, align) == align and os.preadv(fd, [view], align) == align
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


class DiskShard:
    """One file of slots at the layout's ``disk_stride``, read and written with O_DIRECT where
    the filesystem allows it at that alignment (so the page cache neither flatters reads nor
    holds a second copy of the KV in RAM), buffered I/O otherwise (tmpfs; a compressed slot
    stride on a filesystem whose direct I/O needs whole pages). Slot numbers are decided by the
    main process; a shard only moves bytes. The file is created private to the user (0600).
    Reads go in groups (:meth:`read_async`), through native AIO or a thread pool (``reader``,
    see :class:`WorkerIO`)."""

    def __init__(self, path: str, layout: BlockLayout, direct: bool = True, reader: str = "auto") -> None:
        if reader not in READERS:
            raise DiskIOError(f"unknown disk reader {reader!r} (choose from {', '.join(READERS)})")
        self.path, self.layout, self.stride = path, layout, layout.disk_stride
        flags = os.O_RDWR | os.O_CREAT
        self.direct = False
        align = min(PAGE, self.stride & -self.stride)             # the stride's largest power of 2
        if direct and hasattr(os, "O_DIRECT") and direct_io_at(os.path.dirname(path) or ".", align):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:        # tmpfs and some others refuse O_DIRECT
                    raise DiskIOError(f"cannot open {path}: {e.strerror}") from e
        if not self.direct:
            try:
                self.fd = os.open(path, flags, 0o600)
            except OSError as e:
                raise DiskIOError(f"cannot open {path}: {e.strerror}") from e
        self.aio = None
        if reader == "aio" or (reader == "auto" and self.direct):
            try:
                self.aio = AioReader()
            except OSError as e:
                if reader == "aio":
                    os.close(self.fd)
                    raise DiskIOError(f"native AIO unavailable for {path}: {e.strerror or e}") from None
        self.pools: dict[int, ThreadPoolExecutor] = {}               # reads in flight -> its threads

    @property
    def reader(self) -> str:
        return "aio" if self.aio is not None else "threads"

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()
            self.aio = None
        for pool in self.pools.values():
            pool.shutdown(wait=True)
        self.pools.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def extent(self) -> int:
        """Slots the file holds (written or not, up to the last written one)."""
        return os.fstat(self.fd).st_size // self.stride

    @staticmethod
    def runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
        """Sorted slots -> (first slot, count, index of the first in ``slots``) of consecutive runs."""
        if len(slots) == 0:
            return []
        breaks = np.nonzero(np.diff(slots) != 1)[0] + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(slots)]])
        return [(int(slots[s]), int(e - s), int(s)) for s, e in zip(starts, ends)]

    def write(self, slots: np.ndarray, data: memoryview, buf: mmap.mmap) -> None:
        """Write ``data`` (``len(slots)`` slots of ``slot_bytes`` each, in ``slots`` order)."""
        sb, st = self.layout.slot_bytes, self.stride
        order = np.argsort(slots, kind="stable")
        s_sorted = slots[order]
        for first, count, at in self.runs(s_sorted):
            for i in range(count):                      # pack into the aligned buffer at the stride
                src = int(order[at + i]) * sb
                buf[i * st:i * st + sb] = data[src:src + sb]
            self._pwrite(memoryview(buf)[:count * st], first * st)

    def read_plan(self, slots: np.ndarray, max_bytes: int) -> np.ndarray:
        """Sorted, unique slots -> reads ``[n, (buffer offset, bytes, file offset)]`` of at most
        ``max_bytes`` each, adjacent slots coalesced, placing the slots back to back at the
        stride (independent reads: they can be issued concurrently)."""
        st, per, n = self.stride, max(1, max_bytes // self.stride), len(slots)
        if n == 0:
            return np.zeros((0, 3), np.int64)
        brk = np.ones(n, bool)
        brk[1:] = np.diff(slots) != 1                                    # a run starts here
        run_start = np.nonzero(brk)[0]
        pos = np.arange(n) - run_start[np.cumsum(brk) - 1]                # place within its run
        starts = np.nonzero(pos % per == 0)[0]                           # runs cut every `per` slots
        counts = np.diff(np.append(starts, n))
        return np.stack([starts * st, counts * st, slots[starts] * st], axis=1).astype(np.int64)

    def read_one(self, buf: mmap.mmap, buf_off: int, nbytes: int, file_off: int) -> int:
        try:
            n = os.preadv(self.fd, [memoryview(buf)[buf_off:buf_off + nbytes]], file_off)
        except OSError as e:
            raise DiskIOError(f"read from {self.path} failed: {e.strerror}") from e
        if n != nbytes:
            raise DiskIOError(f"short read from {self.path} ({n} of {nbytes} bytes)")
        return n

    def read(self, slots: np.ndarray, buf: mmap.mmap, max_bytes: int = 1 << 30, depth: int = IO_DEPTH_MIN) -> int:
        """Read the slots (sorted, unique) into ``buf`` back to back at the stride; returns bytes read."""
        return self.read_async(self.read_plan(slots, max_bytes), buf, depth).wait()

    def read_async(self, plan: np.ndarray, buf, depth: int) -> Reads:
        """Start the reads of a :meth:`read_plan` into ``buf``, ``depth`` in flight."""
        if self.aio is not None:
            if not len(plan):
                return Reads(self, None, [])
            base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
            try:
                return Reads(self, self.aio.submit(self.fd, base + plan[:, 0], plan[:, 1], plan[:, 2], depth), [])
            except OSError as e:
                raise DiskIOError(f"read from {self.path} failed: {e.strerror}") from e
        pool = self.pools.get(depth)
        if pool is None:
            pool = self.pools[depth] = ThreadPoolExecutor(depth, thread_name_prefix=f"kv-read{depth}")
        return Reads(self, None, [pool.submit(self.read_one, buf, *map(int, r)) for r in plan])

    def _pwrite(self, view: memoryview, offset: int) -> None:
        try:
            n = os.pwrite(self.fd, view, offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskIOError(f"offload disk full writing {self.path}: {e.strerror}") from e
            raise DiskIOError(f"write to {self.path} failed: {e.strerror}") from e
        if n != len(view):
            raise DiskIOError(f"offload disk full writing {self.path} (short write of {n}/{len(view)} bytes)")


class Reads:
    """A group of reads in flight (:meth:`DiskShard.read_async`); :meth:`wait` returns its bytes
    (once; raises :class:`DiskIOError`)."""

    def __init__(self, shard: DiskShard, group: int | None, futures: list[Future]) -> None:
        self.shard, self.group, self.futures = shard, group, futures

    def wait(self) -> int:
        if self.group is None:
            return sum(f.result() for f in self.futures)
        g, self.group = self.group, None
        try:
            return self.shard.aio.wait(g)
        except AioError as e:
            if e.errno == 0:
                raise DiskIOError(f"short read from {self.shard.path} at offset {e.offset}") from None
            raise DiskIOError(f"read from {self.shard.path} failed: {e.strerror}") from None


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)``, without its cost when ``x`` is sorted and unique already (a dense
    request's slots, a chunk's run: np.unique hashes or sorts whatever it is given; ~30 µs for
    500 slots, several times a layer)."""
    return x if len(x) < 2 or bool((x[1:] > x[:-1]).all()) else np.unique(x)


def find_sorted(keys: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element of ``x``: whether it is in the sorted array ``keys``, and its index there
    (meaningful where it is)."""
    if not len(keys):
        return np.zeros(len(x), bool), np.zeros(len(x), np.int64)
    at = np.minimum(np.searchsorted(keys, x), len(keys) - 1)
    return keys[at] == x, at


class BlockCache:
    """Blocks of the shard that sparse attends read, kept in RAM for the next decode steps
    (consecutive tokens choose mostly the same blocks: SmolLM2 at 8K under Quest 1/16 reads
    ~1,100 blocks a step, of which ~75% again the next step). ``slots`` aligned positions
    at the shard's stride; each holds one shard slot (``key``, -1 = free) and the request count
    of its last use (``stamp``).

    Replacement is least-recently-used, except that a block used since the previous request
    for the same layer (i.e. within the last decode step) is never evicted: with a working set
    larger than the cache, plain LRU would evict every block just before its next use (decode
    cycles through the layers) and hit nothing; this way the cache keeps what fits and admits
    fewer new blocks. The owner drops blocks whose slots are rewritten (:meth:`drop`).

    ``resident``: shard slot -> the address of its cached copy (0: not cached), what a sparse
    step attended in this process reads in native code (kernels/select.py's ``SparseStep.plan``)."""

    def __init__(self, slots: int, stride: int) -> None:
        self.n, self.stride = slots, stride
        self.buf = aligned_buffer(slots * stride)
        self.base = np.frombuffer(self.buf, dtype=np.uint8).ctypes.data
        self.resident = np.zeros(0, np.int64)
        self.key = np.full(slots, -1, np.int64)
        self.stamp = np.full(slots, -1, np.int64)
        self.clock = 0
        self.protect = -1                    # stamps above this were used within the current step
        self._prev: dict[int, int] = {}      # layer -> clock of its previous request
        self._index()

    def _index(self) -> None:
        held = np.nonzero(self.key >= 0)[0]
        order = np.argsort(self.key[held], kind="stable")
        self.keys, self.pos = self.key[held][order], held[order]         # sorted slots -> positions

    def start(self, layer: int) -> None:
        """A request for ``layer`` begins: blocks used since that layer's last request stay."""
        self.clock += 1
        self.protect = self._prev.get(layer, -1)
        self._prev[layer] = self.clock

    def lookup(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique ``slots`` -> (those held, their positions), marked used now."""
        hit, at = find_sorted(self.keys, slots)
        pos = self.pos[at[hit]]
        self.stamp[pos] = self.clock
        return slots[hit], pos

    def touch(self, addrs: np.ndarray) -> None:
        """Mark the cached blocks at these addresses (from :attr:`resident`) used now."""
        self.stamp[(addrs - self.base) // self.stride] = self.clock

    def _forget(self, pos: np.ndarray) -> None:
        """Positions about to be reused or emptied: their slots are no longer resident."""
        keys = self.key[pos]
        keys = keys[(keys >= 0) & (keys < len(self.resident))]
        self.resident[keys] = 0

    def admit(self, slots: np.ndarray, src, rows: np.ndarray) -> None:
        """Keep blocks ``slots`` (not held), whose bytes are rows ``rows`` of ``src`` (at the
        stride): into free positions, then in place of the least recently used blocks not used
        within the current step; what does not fit is not kept."""
        free = np.nonzero(self.key < 0)[0]
        if len(free) < len(slots):
            old = np.nonzero((self.key >= 0) & (self.stamp <= self.protect))[0]
            need = len(slots) - len(free)
            if len(old) > need:
                old = old[np.argpartition(self.stamp[old], need - 1)[:need]]
            free = np.concatenate([free, old])
        k = min(len(free), len(slots))
        if k == 0:
            return
        pos, st = free[:k], self.stride
        self._forget(pos)
        dst = np.frombuffer(self.buf, dtype=np.uint8, count=self.n * st).reshape(self.n, st)
        dst[pos] = np.frombuffer(src, dtype=np.uint8, count=(int(rows[:k].max()) + 1) * st).reshape(-1, st)[rows[:k]]
        self.key[pos], self.stamp[pos] = slots[:k], self.clock
        top = int(slots[:k].max()) + 1
        if top > len(self.resident):                  # (grown by doubling: slots come from the shard's extent)
            grown = np.zeros(max(top, 2 * len(self.resident), 1024), np.int64)
            grown[:len(self.resident)] = self.resident
            self.resident = grown
        self.resident[slots[:k]] = self.base + st * pos
        self._index()

    def drop(self, slots: np.ndarray) -> None:
        """Forget blocks whose slots are being rewritten."""
        if len(self.keys) and np.isin(slots, self.keys).any():
            gone = np.nonzero(np.isin(self.key, slots))[0]
            self._forget(gone)
            self.key[gone], self.stamp[gone] = -1, -1
            self._index()


@dataclass
class _Resident:
    """Blocks an attend finds in RAM already (read ahead, or in the block cache): ``slots``
    sorted, slot i at row ``pos[i]`` (at the stride) of buffer ``bufs[src[i]]``, whose address
    is ``addr[i]``."""

    slots: np.ndarray
    src: np.ndarray
    pos: np.ndarray
    bufs: list
    addr: np.ndarray

    @classmethod
    def of(cls, parts: list[tuple[np.ndarray, np.ndarray, object]], stride: int) -> _Resident:
        """From (sorted slots, their rows, buffer) per source; the sources hold different slots."""
        if not parts:
            empty = np.zeros(0, np.int64)
            return cls(empty, empty, empty, [], empty)
        slots = np.concatenate([p[0] for p in parts])
        order = np.argsort(slots, kind="stable")
        src = np.concatenate([np.full(len(p[0]), i, np.int64) for i, p in enumerate(parts)])[order]
        pos = np.concatenate([p[1] for p in parts])[order]
        bases = np.array([np.frombuffer(p[2], dtype=np.uint8).ctypes.data for p in parts], np.int64)
        return cls(slots[order], src, pos, [p[2] for p in parts], bases[src] + stride * pos)

    def find(self, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per block of ``blk``: whether it is resident, and its index in ``slots``."""
        return find_sorted(self.slots, blk)


@dataclass
class _Batch:
    """Items ``i0 .. i1`` of a request and the sorted unique slots they read."""

    i0: int
    i1: int
    slots: np.ndarray


class DiskWorkerServer:
    """What runs inside the worker process (also callable in-process, for tests)."""

    def __init__(self, path: str, layout: BlockLayout, group: int, threads: int, io: WorkerIO,
                 native: bool = True) -> None:
        self.shard = DiskShard(path, layout, reader=io.reader)
        self.layout, self.threads, self.opts = layout, threads, io
        self.batch_slots = max(layout.chunk_blocks, io.batch_bytes // layout.disk_stride)
        self.bufs = [aligned_buffer(self.batch_slots * layout.disk_stride) for _ in range(2)]
        self.ahead_slots = max(self.batch_slots, io.ahead_bytes // layout.disk_stride) if io.ahead_bytes else 0
        # two read-ahead buffers: the next request's blocks are read into one while the attend
        # begun reads the other (a worker process starts that read-ahead before it computes);
        # each grown to what a hint needs, up to ahead_slots
        self.ahead_bufs: list[mmap.mmap | None] = [None, None]
        self.ahead: tuple[np.ndarray, Reads, int] | None = None    # slots being read ahead, reads, buffer
        self.wbuf = aligned_buffer(self.batch_slots * layout.disk_stride)
        cache_slots = io.cache_bytes // layout.disk_stride
        self.cache = BlockCache(cache_slots, layout.disk_stride) if cache_slots else None
        self.kernel = PagedAttention.for_layout(layout, group) if native else None
        self.read_blocks, self.io_bytes = io.read_blocks, io.io_bytes
        self._started = None              # an attend begun, not finished (its state; last: its read-ahead buffer or -1)
        self._staging: mmap.mmap | None = None                       # fetch()'s reads
        self._read_buf: mmap.mmap | None = None                      # read()'s

    def write(self, w: WriteBlocks) -> None:
        slots = np.asarray(w.slots, dtype=np.int64)
        data = memoryview(w.data)
        if self.ahead is not None and find_sorted(self.ahead[0], slots)[0].any():
            self._drop_ahead()                       # the read-ahead holds what is being overwritten
        if self.cache is not None:
            self.cache.drop(slots)
        for i in range(0, len(slots), self.batch_slots):       # bounded staging buffer
            j = min(i + self.batch_slots, len(slots))
            self.shard.write(slots[i:j], data[i * self.layout.slot_bytes:j * self.layout.slot_bytes], self.wbuf)

    def read(self, slots: np.ndarray) -> bytes:
        """The raw bytes of ``slots`` (any order, repeats allowed), ``slot_bytes`` each, in that order."""
        slots = np.asarray(slots, dtype=np.int64)
        uniq, inv = np.unique(slots, return_inverse=True)
        st, sb = self.layout.disk_stride, self.layout.slot_bytes
        buf = self._read_buf = self._holding(self._read_buf, max(1, len(uniq)))   # (no fresh pages a call)
        self.shard.read(uniq, buf, self.io_bytes, self.opts.depth(self.io_bytes))
        raw = np.frombuffer(buf, dtype=np.uint8, count=len(uniq) * st).reshape(len(uniq), st)[:, :sb]
        return raw[inv].tobytes()

    def _holding(self, buf: mmap.mmap | None, slots: int, most: int | None = None) -> mmap.mmap:
        """``buf`` if it holds ``slots`` slots at the stride, else a new one grown by doubling,
        to at most ``most`` slots when given (a buffer kept between calls: reads into it fault
        no fresh pages)."""
        st = self.layout.disk_stride
        have = 0 if buf is None else len(buf) // st
        grown = max(slots, 2 * have)
        return buf if have >= slots else aligned_buffer((grown if most is None else min(most, grown)) * st)

    def _read_async(self, slots: np.ndarray, buf) -> Reads:
        """Issue the batch's reads (coalesced runs). Through native AIO the whole batch goes in
        flight (up to the handle's capacity; ``io_depth`` caps it when set): AIO starts queued
        reads only while some group is waited for, and a read-ahead or the next batch is not
        waited for while the worker attends or idles — the time it is meant to use. A thread
        pool runs by itself: as many threads as suit the reads' size."""
        plan = self.shard.read_plan(slots, self.io_bytes)
        if self.shard.aio is not None:
            depth = self.opts.io_depth or min(len(plan), AIO_CAPACITY)
        else:
            depth = self.opts.depth(plan[:, 1].mean() if len(plan) else 0.0)
        return self.shard.read_async(plan, buf, depth)

    def _read_units(self, slots: np.ndarray) -> np.ndarray:
        """The sorted slots to read for ``slots``: with ``read_blocks`` U > 1, whole aligned
        groups of U slots (a chunk holds whole groups), fewer and larger reads for scattered
        sparse choices at the cost of reading blocks nobody asked for (what is on the file)."""
        u = sorted_unique(slots)
        U = self.read_blocks
        if U == 1 or len(u) == 0:
            return u
        groups = np.unique(u - u % U)
        out = (groups[:, None] + np.arange(U, dtype=np.int64)).reshape(-1)
        return out[out < self.shard.extent()]

    def _batches(self, req: AttendRequest, hits: np.ndarray) -> list[_Batch]:
        """Consecutive runs of items whose slots to read — their blocks not in ``hits`` (already
        read ahead), widened to whole read groups — come to at most ``batch_slots`` (at least one
        item each: an item is one chunk, at most ``chunk_blocks`` slots), with those slots."""
        first, slots = req.first, req.slots
        if self.read_blocks == 1 and not len(hits):            # exactly the items' slots: no per-item work
            return self._pack(first, slots)
        miss = ~find_sorted(hits, slots)[0] if len(hits) else np.ones(len(slots), bool)   # (hits: sorted, unique)
        if self.read_blocks == 1:                              # the items' slots that are not resident
            before = np.zeros(len(slots) + 1, np.int64)
            np.cumsum(miss, out=before[1:])
            return self._pack(before[first], slots[miss])
        need = []                                                 # per item: its slots to read
        for i in range(req.num_items):
            a, b = first[i], first[i + 1]
            u = self._read_units(slots[a:b][miss[a:b]])
            need.append(u[~find_sorted(hits, u)[0]] if len(hits) else u)     # (whole groups may hold hits)
        need_first = np.zeros(len(need) + 1, np.int64)
        np.cumsum([len(u) for u in need], out=need_first[1:])
        return self._pack(need_first, np.concatenate(need) if need else np.zeros(0, np.int64))

    def _pack(self, first: np.ndarray, slots: np.ndarray) -> list[_Batch]:
        """Items ``i`` read ``slots[first[i]:first[i+1]]``: consecutive items whose slots come
        to at most ``batch_slots`` (at least one item) make a batch, with its sorted unique slots."""
        N, out, i0 = len(first) - 1, [], 0
        while i0 < N:                                   # the most items whose slots fit (at least one)
            i1 = max(i0 + 1, int(np.searchsorted(first, first[i0] + self.batch_slots, side="right")) - 1)
            out.append(_Batch(i0, i1, sorted_unique(slots[first[i0]:first[i1]])))
            i0 = i1
        return out

    def attend(self, req: AttendRequest) -> AttendResult:
        self.begin(req)
        return self.finish()

    def begin(self, req: AttendRequest) -> None:
        """Start an attend: its first batch of reads is issued (an in-process caller computes
        something else meanwhile, then calls :meth:`finish`)."""
        # blocks the previous prefetch() read ahead, or that the block cache holds, are attended
        # from there (a guess that missed costs its reads, nothing else); the rest are read in
        # batches, each while the previous one is attended
        ahead, self.ahead = self.ahead, None
        read, parts, cache_src = 0, [], -1
        if ahead is not None:
            read += ahead[1].wait()                                 # raises the reader's DiskIOError
            parts.append((ahead[0], np.arange(len(ahead[0]), dtype=np.int64), self.ahead_bufs[ahead[2]]))
        if self.cache is not None:
            self.cache.start(req.layer)
            want = sorted_unique(req.slots)
            if ahead is not None:
                want = want[~find_sorted(ahead[0], want)[0]]
            held, pos = self.cache.lookup(want)
            if len(held):
                cache_src = len(parts)
                parts.append((held, pos, self.cache.buf))
        res = _Resident.of(parts, self.layout.disk_stride)
        batches = self._batches(req, res.slots)
        pending = self._read_async(batches[0].slots, self.bufs[0]) if batches else None
        self._started = (req, read, res, cache_src, batches, pending, -1 if ahead is None else ahead[2])

    def finish(self) -> AttendResult:
        """The result of the attend :meth:`begin` started."""
        req, read, res, cache_src, batches, pending, _ = self._started
        self._started = None
        q = np.ascontiguousarray(req.q, dtype=np.float32)          # [B, L, H, D]
        B, L, H, D = q.shape
        N = req.num_items
        o = np.empty((N * L, H, D), np.float32)
        lse = np.empty((N * L, H), np.float32)
        q_rows = q.reshape(B * L, H, D)
        keep = self.cache is not None and req.masks is not None   # a sparse attend's reads are cached
        for n, bt in enumerate(batches):
            read += pending.wait()
            if n + 1 < len(batches):                              # the next batch is read meanwhile
                pending = self._read_async(batches[n + 1].slots, self.bufs[(n + 1) % 2])
            self._attend_batch(req, bt, self.bufs[n % 2], res, q_rows, L, o, lse)
            if keep and len(bt.slots):
                self.cache.admit(bt.slots, self.bufs[n % 2], np.arange(len(bt.slots), dtype=np.int64))
        hit, at = res.find(req.slots)
        from_cache = int((res.src[at[hit]] == cache_src).sum())
        return AttendResult(o.reshape(N, L, H, D), lse.reshape(N, L, H), read, ahead=int(hit.sum()) - from_cache,
                            cached=from_cache)

    def _attend_batch(self, req: AttendRequest, bt: _Batch, buf, res: _Resident, q_rows: np.ndarray, L: int,
                      o: np.ndarray, lse: np.ndarray) -> None:
        """The items of one batch: their blocks are in ``buf`` (``bt.slots``, sorted, back to back
        at the stride) or resident (``res``: read ahead or cached); their partials go to rows
        ``i0*L .. i1*L`` of ``o`` / ``lse``."""
        lay, st = self.layout, self.layout.disk_stride
        a, b = req.first[bt.i0], req.first[bt.i1]
        blk = req.slots[a:b]
        in_res, at_res = res.find(blk)
        first = req.first[bt.i0:bt.i1 + 1] - a
        row, efirst, idx = expand_rows(req.seq[bt.i0:bt.i1], first, L)
        masks = None if req.masks is None else req.masks[a:b][idx]
        last = np.full(len(row), lay.block_size, np.int64)
        out_o, out_l = o[bt.i0 * L:bt.i1 * L], lse[bt.i0 * L:bt.i1 * L]
        at_buf = np.searchsorted(bt.slots, blk)
        if self.kernel is not None:
            base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
            addr = base + st * at_buf
            if in_res.any():
                addr = np.where(in_res, res.addr[at_res], addr)
            self.kernel(q_rows, Items(row, efirst, last, addr[idx], masks), out_o, out_l, self.threads)
            return
        store = lay.storage
        data = np.empty((len(blk), lay.slot_elems), store)
        sources = [(~in_res, at_buf, buf)] + [(in_res & (res.src[at_res] == i), res.pos[at_res], r)
                                              for i, r in enumerate(res.bufs)]
        for mask, at, src in sources:
            if mask.any():
                arr = np.frombuffer(src, dtype=store).reshape(-1, st // lay.itemsize)
                data[mask] = arr[at[mask], :lay.slot_elems]
        k, v = lay.unpack_f32(data)                                                        # [n, H_kv, bs, D] fp32
        ob, lb = reference.attend_items(q_rows, k[idx], v[idx], row, efirst, last, masks)
        out_o[...], out_l[...] = ob, lb

    def fetch(self, layer: int, slots: np.ndarray, ptrs: np.ndarray, refs: np.ndarray) -> tuple[int, int]:
        """A sparse step attended by this process (no request): ``slots`` (repeats allowed) are
        the layer's chosen blocks of this shard, ``ptrs[refs]`` their addresses, 0 where the
        block cache does not hold them (looked up in native code through
        :attr:`BlockCache.resident`). Reads those (coalesced, many in flight) into a staging
        buffer, fills their addresses in, marks the cached ones used and admits the read ones
        (as :meth:`begin` / :meth:`finish` do for a request). Returns (bytes read, blocks from
        the cache). The addresses stay valid until the next call."""
        cache = self.cache
        if cache is not None:
            cache.start(layer)
        addr = ptrs[refs]
        miss = addr == 0
        hits = len(addr) - int(np.count_nonzero(miss))
        if cache is not None and hits:
            cache.touch(addr[~miss])
        if hits == len(addr):
            return 0, hits
        want = slots[miss]
        need = np.unique(want)
        st = self.layout.disk_stride
        self._staging = self._holding(self._staging, len(need))
        read = self._read_async(need, self._staging).wait()
        base = np.frombuffer(self._staging, dtype=np.uint8).ctypes.data
        ptrs[refs[miss]] = base + st * np.searchsorted(need, want)
        if cache is not None:
            cache.admit(need, self._staging, np.arange(len(need), dtype=np.int64))
        return read, hits

    def prefetch(self, req: AttendRequest) -> None:
        """Start reading the blocks of the next request (the next layer's, known or guessed
        before its query is), up to the read-ahead buffer: the reads overlap the model's
        compute of that layer (and, given between :meth:`begin` and :meth:`finish`, this one's
        attend: it goes to the buffer that attend does not read). A hint: a read it cannot
        start is left to the request that needs those blocks (which reports the error)."""
        if not self.ahead_slots:
            return
        with contextlib.suppress(DiskIOError):
            self._drop_ahead()
        slots = self._read_units(req.slots)[:self.ahead_slots]
        if not len(slots):
            return
        k = 1 if self._started is not None and self._started[-1] == 0 else 0   # not the begun attend's
        buf = self.ahead_bufs[k] = self._holding(self.ahead_bufs[k], len(slots), self.ahead_slots)
        with contextlib.suppress(DiskIOError):
            self.ahead = (slots, self._read_async(slots, buf), k)

    def close(self) -> None:
        """Finish the reads in flight, stop the reader threads and close the file."""
        self._drop_ahead()
        self.shard.close()

    def _drop_ahead(self) -> None:
        """Forget the read-ahead (its reads finish first: they write into its buffer)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead[1].wait()


def _serve(conn, path: str, layout: dict, group: int, threads: int, io: dict, native: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)               # Ctrl-C is the main process's to handle
    try:
        server = DiskWorkerServer(path, BlockLayout(**layout), group, threads, WorkerIO(**io), native)
    except DiskIOError as e:
        conn.send(("err", str(e)))
        return
    conn.send(("ok", os.getpid()))
    later: list = []                      # messages received early (see attend), handled next, in order
    while True:
        try:
            op, payload = later.pop(0) if later else conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            server.close()
            conn.send(("ok", None))
            return
        try:
            if op == "prefetch":                                  # a hint: no reply
                server.prefetch(payload)
            elif op == "attend":                                  # (request, the next one's hint or None)
                req, ahead = payload
                server.begin(req)
                # the next layer's read-ahead starts now, so the disk reads it while this attend
                # computes: sent with the request, or (a hint of its own) already waiting
                if ahead is not None:
                    server.prefetch(ahead)
                for msg in _waiting(conn):
                    if msg[0] != "prefetch":
                        later.append(msg)                         # (handled after this attend, in order)
                        break
                    server.prefetch(msg[1])
                conn.send(("ok", server.finish()))
            else:
                conn.send(("ok", {"write": server.write, "read": server.read}[op](payload)))
        except DiskIOError as e:
            conn.send(("err", str(e)))


def _waiting(conn: Connection):
    """The messages already received, without blocking (a closed pipe: none; the next
    ``recv`` notices)."""
    try:
        while conn.poll(0):
            yield conn.recv()
    except (EOFError, OSError):
        return


def main() -> None:
    ap = argparse.ArgumentParser(description="kvoffload disk worker (started by the engine)")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--layout", required=True)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--io", required=True, help="WorkerIO's fields as JSON")
    ap.add_argument("--no-native", action="store_true")
    a = ap.parse_args()
    _serve(Connection(a.fd), a.path, json.loads(a.layout), a.group, a.threads, json.loads(a.io), not a.no_native)


if __name__ == "__main__":
    main()
