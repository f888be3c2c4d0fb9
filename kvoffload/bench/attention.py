"""``kvoffload bench attention``: decode attention per tier, as effective bandwidth (KV bytes
read / time) beside this machine's peak, measured here by the same run:

* memory: a streaming read of a large buffer with the same threads (``kvo_read_sum``);
* disk: aligned O_DIRECT sequential reads of a file written for the purpose (so the page cache
  cannot flatter the number).

The KV is synthetic (random values; attention cost does not depend on them) with the geometry
of the chosen model, spread over ``layers`` x ``batch`` x ``context`` tokens.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvoffload.attention.workers.local import MemoryWorker
from kvoffload.attention.workers.process import ProcessWorker
from kvoffload.attention.workers.protocol import AttendRequest, WriteBlocks
from kvoffload.config import KVConfig
from kvoffload.errors import ConfigError
from kvoffload.kernels.paged import read_bandwidth_probe
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk import DiskShard, aligned_buffer
from kvoffload.kv.tiers.memory import MemoryTier

MiB = 2**20


@dataclass(frozen=True)
class AttentionBenchConfig:
    """num_kv_heads, group, head_dim: the geometry (default SmolLM2-135M: 3 KV heads, 3 query
    heads each, 64 dims). context, batch, layers: KV attended per step. block_size, dtype: the
    KV layout. threads: CPU threads. disk_workers: processes for the disk tier. reps: timed
    repetitions (median reported). offload_dir: where the disk files go. peak_bytes: size of
    the buffer / file used to measure the peaks. read_batch: a disk worker's read batch."""

    num_kv_heads: int = 3
    group: int = 3
    head_dim: int = 64
    context: int = 8192
    batch: int = 4
    layers: int = 30
    block_size: int = 16
    dtype: str = "bfloat16"
    threads: int = 2
    disk_workers: int = 2
    reps: int = 5
    offload_dir: str | None = None
    peak_bytes: int = 1 << 30
    read_batch: int = KVConfig().disk_read_batch
    tiers: tuple[str, ...] = field(default=("host", "disk"))


@dataclass
class TierResult:
    tier: str
    kv_bytes: int                 # read per decode step (all layers, whole batch)
    seconds: list[float]
    peak_gbs: float

    @property
    def gbs(self) -> float:
        return self.kv_bytes / statistics.median(self.seconds) / 1e9

    @property
    def ratio(self) -> float:
        return self.gbs / self.peak_gbs


def memory_peak(threads: int, nbytes: int, reps: int) -> float:
    """GB/s of a streaming read with ``threads`` threads (median)."""
    probe = read_bandwidth_probe()
    if probe is None:
        raise ConfigError("the native kernels are unavailable (no compiler?): cannot measure memory bandwidth")
    buf = torch.ones(nbytes // 4)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        probe(buf.data_ptr(), buf.numel(), threads)
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times[1:]) / 1e9


def disk_peak(directory: str, nbytes: int, reps: int, chunk: int = 1 << 20) -> float:
    """GB/s of aligned O_DIRECT sequential reads (1 MiB) of a file written for the purpose."""
    path = os.path.join(directory, "peak.bin")
    lay = BlockLayout(16, 1, 128, "float16")          # any layout: only its aligned I/O is used
    shard = DiskShard(path, lay)
    try:
        buf = aligned_buffer(chunk)
        buf.write(np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8).tobytes())
        for off in range(0, nbytes, chunk):
            shard._pwrite(memoryview(buf), off)
        os.fsync(shard.fd)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for off in range(0, nbytes, chunk):
                if os.preadv(shard.fd, [memoryview(buf)], off) != chunk:
                    raise ConfigError(f"short read from {path}")
            times.append(time.perf_counter() - t)
        if not shard.direct:
            print(f"note: {directory} does not support O_DIRECT; the disk peak includes the page cache")
        return nbytes / statistics.median(times) / 1e9
    finally:
        shard.close()
        os.unlink(path)


def run(cfg: AttentionBenchConfig, progress=print) -> list[TierResult]:
    lay = BlockLayout(cfg.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.dtype)
    if cfg.context % cfg.block_size:
        raise ConfigError("--context must be a multiple of --block-size")
    per_seq = cfg.context // cfg.block_size               # blocks per (sequence, layer)
    n_slots = per_seq * cfg.batch * cfg.layers
    H = cfg.num_kv_heads * cfg.group
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    q = torch.randn(cfg.batch, 1, H, cfg.head_dim).to(dt).float()     # fp32 (the activations' values)
    rng = np.random.default_rng(0)
    results = []
    if "host" in cfg.tiers:
        progress(f"host: filling {n_slots * lay.slot_bytes / MiB:.0f} MiB of KV blocks")
        tier = MemoryTier("host", lay, dt, torch.device("cpu"), None, 4096)
        slots = np.array([tier.alloc() for _ in range(n_slots)])
        for seg in tier.segments:
            seg.normal_(0, 1)
        worker = MemoryWorker(tier, cfg.threads)
        reqs = [AttendRequest(layer, tuple(range(cfg.batch)),
                              [slots[(layer * cfg.batch + b) * per_seq:(layer * cfg.batch + b + 1) * per_seq]
                               for b in range(cfg.batch)], q) for layer in range(cfg.layers)]
        peak = memory_peak(cfg.threads, cfg.peak_bytes, cfg.reps)
        times = []
        for _ in range(cfg.reps + 1):
            t = time.perf_counter()
            read = sum(worker.attend(r).bytes_read for r in reqs)
            times.append(time.perf_counter() - t)
        results.append(TierResult("host (RAM)", read, times[1:], peak))
        del tier, worker
    if "disk" in cfg.tiers:
        base = cfg.offload_dir or tempfile.gettempdir()
        directory = tempfile.mkdtemp(prefix="kvoffload-bench-", dir=base)
        workers = []
        try:
            progress(f"disk: measuring O_DIRECT read bandwidth in {base}")
            peak = disk_peak(directory, cfg.peak_bytes, max(2, cfg.reps // 2))
            per_worker = max(1, cfg.threads // cfg.disk_workers)       # as TieredBackend does
            workers = [ProcessWorker(os.path.join(directory, f"shard-{i}.kv"), lay, per_worker, cfg.read_batch)
                       for i in range(cfg.disk_workers)]
            progress(f"disk: writing {n_slots * lay.disk_stride / MiB:.0f} MiB of KV blocks "
                     f"over {cfg.disk_workers} workers")
            # block i of every (layer, sequence) goes to worker i % n, its slots consecutive per layer
            owner = np.arange(n_slots) % cfg.disk_workers
            local = np.arange(n_slots) // cfg.disk_workers
            chunk = 2048
            for w_i, w in enumerate(workers):
                mine = local[owner == w_i]
                for s in range(0, len(mine), chunk):
                    part = mine[s:s + chunk]
                    data = rng.integers(0, 2**16, size=(len(part), lay.slot_bytes // 2), dtype=np.uint16)
                    if cfg.dtype == "bfloat16":          # finite bf16 values: clear the exponent's top bit
                        data &= 0xBFFF
                    w.write(WriteBlocks(part, data.tobytes()))
                w.sync()
            ids = np.arange(n_slots).reshape(cfg.layers, cfg.batch, per_seq)
            q_np = q.numpy()
            times, read = [], 0
            for _ in range(cfg.reps + 1):
                read = 0
                t = time.perf_counter()
                for layer in range(cfg.layers):
                    for w_i, w in enumerate(workers):
                        blocks = [local[ids[layer, b]][owner[ids[layer, b]] == w_i] for b in range(cfg.batch)]
                        w.submit(AttendRequest(layer, tuple(range(cfg.batch)), blocks, q_np))
                    read += sum(w.collect().bytes_read for w in workers)
                times.append(time.perf_counter() - t)
            results.append(TierResult(f"disk ({cfg.disk_workers} workers)", read, times[1:], peak))
        finally:
            for w in workers:
                w.close()
            for f in os.listdir(directory):
                os.unlink(os.path.join(directory, f))
            os.rmdir(directory)
    return results


def markdown(cfg: AttentionBenchConfig, results: list[TierResult]) -> str:
    lines = [f"decode attention, {cfg.batch} x {cfg.context} tokens x {cfg.layers} layers, "
             f"{cfg.num_kv_heads} KV heads x {cfg.group} x {cfg.head_dim} dims, {cfg.dtype}, "
             f"{cfg.threads} threads; median of {cfg.reps}",
             "",
             "| tier | KV read / step | time / step | effective GB/s | peak GB/s (measured) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.tier} | {r.kv_bytes / MiB:.0f} MiB | {statistics.median(r.seconds) * 1e3:.1f} ms "
                     f"| {r.gbs:.2f} | {r.peak_gbs:.2f} | {r.ratio:.2f} |")
    return "\n".join(lines)
