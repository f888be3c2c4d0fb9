"""Host memory on transparent huge pages, for the buffers a decode step streams every token
(the decode-format weights, the KV blocks).

On 4 KiB pages the hardware prefetcher stops at every page boundary and every page costs a
TLB walk. Measured on the 2-core EPYC of ``benchmarks/README.md`` ("Huge pages"), a 400 MiB
sequential read: 26 GB/s on 4 KiB pages against 34 GB/s on 2 MiB pages (one core: 19 against
32 GB/s). PyTorch's allocator asks for huge pages only under ``THP_MEM_ALLOC_ENABLE=1``, read
once at start-up, so we map such memory ourselves: an anonymous private map, aligned to
:data:`HUGE_PAGE` and advised ``MADV_HUGEPAGE`` before its first touch (the kernel's THP mode
``madvise``, the common default, then backs it with huge pages; under ``never`` it is plain
memory). Where ``mmap.madvise`` is missing (not Linux) :func:`zeros` is ``torch.zeros``.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap

import torch

HUGE_PAGE = 2 << 20              # x86-64 / aarch64 (4 KiB base pages) PMD size
MIN_BYTES = 1 << 20              # smaller buffers stay on the ordinary allocator
ALIGN = 64                       # each tensor packed into a shared map starts on a cache line
TRIM_BYTES = 64 << 20            # move_module_tensors hands freed heap pages back every this many bytes


def supported() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def _map(nbytes: int) -> tuple[mmap.mmap, int]:
    """A private anonymous map with ``nbytes`` usable from the returned offset (a multiple of
    :data:`HUGE_PAGE` in address terms), advised for huge pages."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    off = (-base) % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, off, nbytes)
    except OSError:              # a kernel built without THP: plain pages, same contents
        pass
    return m, off


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | None = None,
          pin: bool = False) -> torch.Tensor:
    """A zero tensor; on the CPU, unpinned and of at least :data:`MIN_BYTES`, on huge pages
    (fresh anonymous pages read as zeros: no fill pass, and untouched pages cost no memory).
    Otherwise ``torch.zeros`` on ``device`` (pinned if asked)."""
    device = torch.device("cpu") if device is None else device
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or pin or nbytes < MIN_BYTES or not supported():
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
    return Packer(nbytes).take(shape, dtype)


class Packer:
    """Tensors laid out one after another in one huge-page map of ``nbytes`` (each on a
    64-byte boundary), so that only the map's last huge page is partly used."""

    def __init__(self, nbytes: int) -> None:
        self.map, self.off = _map(nbytes)
        self.end = self.off + nbytes

    @staticmethod
    def size(t: torch.Tensor) -> int:
        return -(-t.nbytes // ALIGN) * ALIGN

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The next ``shape`` x ``dtype`` of the map, as a tensor (zeros until written)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.off + nbytes > self.end:
            raise ValueError("huge-page map full")
        v = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=self.off).view(dtype).view(shape)
        self.off += -(-nbytes // ALIGN) * ALIGN
        return v

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (contiguous, CPU) in the map."""
        return self.take(t.shape, t.dtype).copy_(t)


def move_module_tensors(model: torch.nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Re-home every CPU parameter and buffer of ``model`` of at least ``min_bytes`` into one
    huge-page map, in module order (a tensor shared by two modules stays shared); returns the
    bytes moved. One tensor at a time: its old storage is freed as soon as its owners point at
    the copy (when the model held the last reference), so the peak stays about one tensor
    above the model's size. Call it before anything records a tensor's address (the fused
    layers' descriptors)."""
    if not supported():
        return 0
    owners: dict[int, list[tuple[torch.nn.Module, str, bool]]] = {}     # storage address -> owners
    sizes: dict[int, int] = {}
    for mod in model.modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is None or t.device.type != "cpu" or t.nbytes < min_bytes or not t.is_contiguous():
                    continue
                owners.setdefault(t.data_ptr(), []).append((mod, name, is_param))
                sizes[t.data_ptr()] = Packer.size(t)
    if not owners:
        return 0
    packer, moved, untrimmed = Packer(sum(sizes.values())), 0, 0
    for refs in owners.values():
        mod, name, is_param = refs[0]
        new = packer.copy((mod._parameters if is_param else mod._buffers)[name])
        for mod, name, is_param in refs:
            if is_param:
                mod._parameters[name].data = new
            else:
                mod._buffers[name] = new
        moved += new.nbytes
        untrimmed += new.nbytes
        if untrimmed >= TRIM_BYTES:          # old homes on the C heap stay resident until trimmed
            trim_heap()
            untrimmed = 0
    trim_heap()
    return moved


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).
    Loading frees many mid-sized buffers (codes being converted, the weights' first homes before
    :func:`move_module_tensors`); once glibc's adaptive mmap threshold has risen, those live on
    the heap, and their pages stay resident after ``free``. Qwen2.5-Coder-0.5B (whose Q4_K
    layers' int32 codes raise the threshold): RSS after loading 1066 MiB untrimmed, 802 trimmed
    every :data:`TRIM_BYTES` moved (peak of the load 987 → 710 MiB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the process's own symbols (resolved once), or None."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
