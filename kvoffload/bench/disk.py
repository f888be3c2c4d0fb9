"""``kvoffload bench disk``: what this disk gives the disk tier — O_DIRECT read throughput against
request size and queue depth, through the tier's own I/O paths: ``threads`` (``DiskShard.read_one``
from a pool of threads, each reading back to back: ``depth`` reads always in flight) and ``aio``
(``DiskShard.read_async`` with native AIO: ``depth`` reads queued at once, then waited for — what
a sparse layer does with its chosen blocks).

Dense decode reads each chunk whole (a long sequential request); sparse decode reads the chosen
blocks of many chunks (small requests scattered over the file). The table says which request
size and how many requests in flight keep the disk busy, which is what the on-disk granularity
and the workers' I/O depth are chosen from. Offsets are random, aligned to the request size, over
a file written for the purpose (larger than the page cache would matter for: O_DIRECT bypasses it).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kvoffload.kv.layout import PAGE, BlockLayout
from kvoffload.kv.tiers.disk_worker import DiskShard, aligned_buffer

MiB = 2**20


@dataclass(frozen=True)
class DiskBenchConfig:
    """sizes: request sizes in bytes (multiples of the page). depths: requests in flight.
    file_bytes: size of the test file. seconds: time per (size, depth) cell, at least.
    reps: repetitions of each cell (median). offload_dir: where the file goes. readers: the
    I/O paths to measure (``threads``, ``aio``; aio is skipped where unavailable)."""

    sizes: tuple[int, ...] = (4096, 12288, 16384, 65536, 196608, 1 << 20)
    depths: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    file_bytes: int = 1 << 30
    seconds: float = 0.5
    reps: int = 3
    offload_dir: str | None = None
    readers: tuple[str, ...] = ("threads", "aio")


@dataclass
class Cell:
    size: int
    depth: int
    reader: str = "threads"
    gbs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.gbs)


def _cell(shard: DiskShard, pool: ThreadPoolExecutor, size: int, depth: int, file_bytes: int, seconds: float,
          seed: int) -> float:
    """GB/s of ``depth`` readers each issuing random ``size``-byte reads back to back for ``seconds``."""
    n_slots = file_bytes // size
    deadline = time.perf_counter() + seconds

    def reader(i: int) -> int:
        buf = aligned_buffer(size)
        rng = np.random.default_rng(seed * 1000 + i)
        done = 0
        while time.perf_counter() < deadline:
            for off in rng.integers(0, n_slots, 64):
                done += shard.read_one(buf, 0, size, int(off) * size)
        return done

    t = time.perf_counter()
    total = sum(pool.map(reader, range(depth)))
    return total / (time.perf_counter() - t) / 1e9


def _cell_aio(shard: DiskShard, size: int, depth: int, file_bytes: int, seconds: float, seed: int) -> float:
    """GB/s of groups of ``depth`` random ``size``-byte reads queued at once and waited for."""
    n_slots = file_bytes // size
    buf = aligned_buffer(size * depth)
    rng = np.random.default_rng(seed)
    at = np.arange(depth, dtype=np.int64) * size
    sizes = np.full(depth, size, np.int64)
    done, t = 0, time.perf_counter()
    deadline = t + seconds
    while time.perf_counter() < deadline:
        plan = np.stack([at, sizes, rng.integers(0, n_slots, depth) * size], axis=1)
        done += shard.read_async(plan, buf, depth).wait()
    return done / (time.perf_counter() - t) / 1e9


def run(cfg: DiskBenchConfig, progress=print) -> tuple[list[Cell], bool]:
    """The table, and whether the file was read with O_DIRECT."""
    base = cfg.offload_dir or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="kvoffload-diskbench-", dir=base)
    os.close(fd)
    shard = DiskShard(path, BlockLayout(16, 1, 128, "float16"))     # only its aligned I/O is used
    try:
        progress(f"writing a {cfg.file_bytes / MiB:.0f} MiB test file in {base}")
        chunk = 4 * MiB
        buf = aligned_buffer(chunk)
        rng = np.random.default_rng(0)
        for off in range(0, cfg.file_bytes, chunk):
            buf[:] = rng.integers(0, 255, chunk, dtype=np.uint8).tobytes()
            shard._pwrite(memoryview(buf), off)
        os.fsync(shard.fd)
        readers = [r for r in cfg.readers if r != "aio" or shard.aio is not None]
        if len(readers) < len(cfg.readers):
            progress("native AIO is unavailable here (or the file is not O_DIRECT): threads only")
        cells = [Cell(s, d, r) for r in readers for s in cfg.sizes for d in cfg.depths]
        with ThreadPoolExecutor(max(cfg.depths)) as pool:
            for rep in range(cfg.reps):                      # cells interleaved across repetitions
                for c in cells:
                    c.gbs.append(_cell(shard, pool, c.size, c.depth, cfg.file_bytes, cfg.seconds, rep)
                                 if c.reader == "threads" else
                                 _cell_aio(shard, c.size, c.depth, cfg.file_bytes, cfg.seconds, rep))
                progress(f"repetition {rep + 1}/{cfg.reps} done")
        return cells, shard.direct
    finally:
        shard.close()
        os.unlink(path)


def markdown(cfg: DiskBenchConfig, cells: list[Cell], direct: bool) -> str:
    head = "| request | " + " | ".join(f"QD {d}" for d in cfg.depths) + " |"
    lines = [f"random {'O_DIRECT' if direct else 'buffered (no O_DIRECT here)'} reads, GB/s (median of {cfg.reps}), "
             f"{cfg.file_bytes / MiB:.0f} MiB file, {cfg.seconds:g} s a cell"]
    for reader in dict.fromkeys(c.reader for c in cells):
        what = ("a pool of threads, QD reads always in flight" if reader == "threads"
                else "native AIO, groups of QD reads queued at once and waited for")
        lines += ["", f"{reader} ({what}):", "", head, "|---|" + "---|" * len(cfg.depths)]
        for s in cfg.sizes:
            row = [c for c in cells if c.size == s and c.reader == reader]
            label = f"{s // 1024} KiB" if s < MiB else f"{s / MiB:g} MiB"
            lines.append(f"| {label} | " + " | ".join(f"{c.median:.2f}" for c in row) + " |")
    return "\n".join(lines)


def parse_sizes(text: str) -> tuple[int, ...]:
    from kvoffload.config import parse_size
    from kvoffload.errors import ConfigError

    out = []
    for t in text.split(","):
        n = parse_size(t.strip())
        if not n or n % PAGE:
            raise ConfigError(f"--request-sizes: {t.strip()!r} is not a positive multiple of {PAGE} bytes")
        out.append(n)
    return tuple(out)
