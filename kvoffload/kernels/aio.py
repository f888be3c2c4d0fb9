"""Binding of ``aio.c``: groups of O_DIRECT reads queued with Linux native AIO and waited for
per group (the disk tier's reader; a thread pool is the fallback where the kernel refuses AIO)."""

from __future__ import annotations

import ctypes
import os

import numpy as np

from kvoffload.kernels.build import load

_P, _L = ctypes.c_void_p, ctypes.c_int64
CAPACITY = 64                    # reads in flight at most, per handle


class AioError(OSError):
    """A read of a group failed: ``errno`` (0 for a short read) and the file ``offset``."""

    def __init__(self, err: int, offset: int) -> None:
        super().__init__(err, os.strerror(err) if err else "short read")
        self.offset = offset


class AioReader:
    """One handle: :meth:`submit` queues a group of reads, :meth:`wait` returns its bytes. Use it
    from one thread. Raises ``OSError`` at construction where native AIO is unavailable."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        lib = load("aio")
        if lib is None:
            raise OSError("native AIO reader unavailable (no native kernels)")
        lib.kvo_aio_new.argtypes, lib.kvo_aio_new.restype = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)], _P
        lib.kvo_aio_submit.argtypes = [_P, ctypes.c_int, _L, _P, _P, _P, ctypes.c_int]
        lib.kvo_aio_submit.restype = _L
        lib.kvo_aio_wait.argtypes, lib.kvo_aio_wait.restype = [_P, ctypes.c_int, ctypes.POINTER(_L)], _L
        lib.kvo_aio_free.argtypes, lib.kvo_aio_free.restype = [_P], None
        lib.kvo_aio_short.restype = _L
        self.lib, self.short = lib, lib.kvo_aio_short()
        err = ctypes.c_int(0)
        self.h = lib.kvo_aio_new(capacity, ctypes.byref(err))
        if not self.h:
            raise OSError(err.value, f"io_setup refused: {os.strerror(err.value)}")
        self._bad = _L(-1)

    def submit(self, fd: int, buf_addr: np.ndarray, nbytes: np.ndarray, offset: np.ndarray, limit: int) -> int:
        """Queue reads ``i`` of ``nbytes[i]`` from file ``offset[i]`` into address ``buf_addr[i]``
        (int64 arrays; O_DIRECT-aligned), at most ``limit`` in flight; returns the group id."""
        a, n, o = (np.ascontiguousarray(x, np.int64) for x in (buf_addr, nbytes, offset))
        g = self.lib.kvo_aio_submit(self.h, fd, len(a), a.ctypes.data, n.ctypes.data, o.ctypes.data, int(limit))
        if g < 0:
            raise AioError(-g, -1)
        return g

    def wait(self, group: int) -> int:
        """The group's bytes once every read of it is in (raises :class:`AioError`)."""
        r = self.lib.kvo_aio_wait(self.h, group, ctypes.byref(self._bad))
        if r < 0:
            raise AioError(0 if r == self.short else -r, self._bad.value)
        return r

    def close(self) -> None:
        if self.h:
            self.lib.kvo_aio_free(self.h)
            self.h = None

    def __del__(self) -> None:
        self.close()
