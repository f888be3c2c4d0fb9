"""A disk shard: one file of page-aligned slots, read and written with O_DIRECT where the
filesystem allows it (so the page cache neither flatters reads nor holds a second copy of the
KV in RAM), buffered I/O otherwise. Torch-free: it runs inside disk worker processes.

Slot allocation is decided by the owner of the block tables (the main process); a shard only
moves bytes. A restarted worker reopens the same file and finds every block it had.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from kvoffload.errors import KvoffloadError
from kvoffload.kv.layout import PAGE, BlockLayout


class DiskIOError(KvoffloadError):
    """A disk read or write failed (message names the file and the cause)."""


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what O_DIRECT needs)."""
    return mmap.mmap(-1, max(PAGE, -(-nbytes // PAGE) * PAGE))


class DiskShard:
    def __init__(self, path: str, layout: BlockLayout, direct: bool = True) -> None:
        self.path, self.layout, self.stride = path, layout, layout.disk_stride
        flags = os.O_RDWR | os.O_CREAT
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

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

    def read_plan(self, slots: np.ndarray, max_bytes: int) -> list[tuple[int, int, int]]:
        """Sorted, unique slots -> reads ``(buffer offset, bytes, file offset)`` of at most
        ``max_bytes`` each, placing the slots back to back at the stride (independent reads:
        they can be issued concurrently)."""
        st, per = self.stride, max(1, max_bytes // self.stride)
        plan = []
        for first, count, at in self.runs(slots):
            for i in range(0, count, per):
                n = min(per, count - i)
                plan.append(((at + i) * st, n * st, (first + i) * st))
        return plan

    def read_one(self, buf: mmap.mmap, buf_off: int, nbytes: int, file_off: int) -> int:
        try:
            n = os.preadv(self.fd, [memoryview(buf)[buf_off:buf_off + nbytes]], file_off)
        except OSError as e:
            raise DiskIOError(f"read from {self.path} failed: {e.strerror}") from e
        if n != nbytes:
            raise DiskIOError(f"short read from {self.path} ({n} of {nbytes} bytes)")
        return n

    def read(self, slots: np.ndarray, buf: mmap.mmap, max_bytes: int = 1 << 30) -> int:
        """Read the slots (sorted, unique) into ``buf`` back to back at the stride; returns bytes read."""
        return sum(self.read_one(buf, *r) for r in self.read_plan(slots, max_bytes))

    def _pwrite(self, view: memoryview, offset: int) -> None:
        try:
            n = os.pwrite(self.fd, view, offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskIOError(f"offload disk full writing {self.path}: {e.strerror}") from e
            raise DiskIOError(f"write to {self.path} failed: {e.strerror}") from e
        if n != len(view):
            raise DiskIOError(f"offload disk full writing {self.path} (short write of {n}/{len(view)} bytes)")
