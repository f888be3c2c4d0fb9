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

from kvoffload.config import KVConfig
from kvoffload.dtypes import torch_dtype
from kvoffload.errors import ConfigError
from kvoffload.kernels.paged import read_bandwidth_probe
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.store import build_tiers
from kvoffload.kv.tiers.disk_worker import DiskShard, aligned_buffer
from kvoffload.kv.tiers.protocol import AttendRequest, Tier, TierContext, TierSpec

MiB = 2**20


@dataclass(frozen=True)
class AttentionBenchConfig:
    """num_kv_heads, group, head_dim: the geometry (default SmolLM2-135M: 3 KV heads, 3 query
    heads each, 64 dims). context, batch, layers: KV attended per step. block_size, dtype: the
    KV layout (dtype may be a compressed format: int8, int4; kv_group_size: its value group, 0 =
    the whole head). threads: CPU threads. disk_workers: processes for the disk tier. reps: timed
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
    kv_group_size: int = 0
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


def _tier(name: str, cfg: AttentionBenchConfig, lay: BlockLayout) -> Tier:
    """One tier, built as the tiered backend builds it (its registered class, a TierContext)."""
    kv = KVConfig(block_size=cfg.block_size, offload_dir=cfg.offload_dir, disk_workers=cfg.disk_workers,
                  disk_read_batch=cfg.read_batch, disk_read_ahead=0, kv_tiers=f"{name}:none")
    ctx = TierContext(lay, cfg.group, torch.device("cpu"), cfg.threads, kv)
    return build_tiers((TierSpec(name, None),), ctx)[0]


def _requests(cfg: AttentionBenchConfig, lay: BlockLayout, tier: Tier, q) -> list[AttendRequest]:
    """Chunks for every (layer, sequence), then one request per layer (every chunk an item)."""
    per_seq = cfg.context // cfg.block_size
    n_chunks = -(-per_seq // lay.chunk_blocks)
    reqs = []
    for layer in range(cfg.layers):
        seq, counts, slots = [], [], []
        for b in range(cfg.batch):
            for c in range(n_chunks):
                chunk = tier.alloc()
                n = min(lay.chunk_blocks, per_seq - c * lay.chunk_blocks)
                seq.append(b)
                counts.append(n)
                slots.append(chunk * lay.chunk_blocks + np.arange(n, dtype=np.int64))
        first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        reqs.append(AttendRequest(layer, q, np.array(seq, np.int64), first, np.concatenate(slots)))
    return reqs


def random_slots(lay: BlockLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, slot_elems]`` slots of random KV (compressed ones quantised from random values)."""
    if lay.quant:
        shape = (lay.num_kv_heads, n * lay.block_size, lay.head_dim)
        return lay.pack(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    return torch.randn(n, lay.slot_elems, generator=gen).to(torch_dtype(lay.dtype))


def _time(tier: Tier, reqs: list[AttendRequest], reps: int) -> tuple[list[float], int]:
    times, read = [], 0
    for _ in range(reps + 1):
        read = 0
        t = time.perf_counter()
        for r in reqs:
            tier.submit(r)
            read += tier.collect().bytes_read
        times.append(time.perf_counter() - t)
    return times[1:], read


def run(cfg: AttentionBenchConfig, progress=print) -> list[TierResult]:
    lay = BlockLayout(cfg.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, group=cfg.kv_group_size)
    if cfg.context % cfg.block_size:
        raise ConfigError("--context must be a multiple of --block-size")
    H = cfg.num_kv_heads * cfg.group
    dt = torch_dtype("bfloat16" if lay.quant else cfg.dtype)
    q = torch.randn(cfg.batch, 1, H, cfg.head_dim).to(dt).float()     # fp32 (the activations' values)
    gen = torch.Generator().manual_seed(0)
    results = []
    if "host" in cfg.tiers:
        tier = _tier("host", cfg, lay)
        reqs = _requests(cfg, lay, tier, q)
        n_slots = sum(len(r.slots) for r in reqs)
        progress(f"host: filling {n_slots * lay.slot_bytes / MiB:.0f} MiB of KV blocks")
        for r in reqs:
            tier.write(r.slots, random_slots(lay, len(r.slots), gen))
        peak = memory_peak(cfg.threads, cfg.peak_bytes, cfg.reps)
        times, read = _time(tier, reqs, cfg.reps)
        results.append(TierResult("host (RAM)", read, times, peak))
        tier.close()
        del tier, reqs
    if "disk" in cfg.tiers:
        base = cfg.offload_dir or tempfile.gettempdir()
        directory = tempfile.mkdtemp(prefix="kvoffload-bench-", dir=base)
        tier = None
        try:
            progress(f"disk: measuring O_DIRECT read bandwidth in {base}")
            peak = disk_peak(directory, cfg.peak_bytes, max(2, cfg.reps // 2))
            tier = _tier("disk", cfg, lay)
            reqs = _requests(cfg, lay, tier, q.numpy())
            n_slots = sum(len(r.slots) for r in reqs)
            progress(f"disk: writing {n_slots * lay.disk_stride / MiB:.0f} MiB of KV blocks "
                     f"over {cfg.disk_workers} workers")
            for r in reqs:
                for s in range(0, len(r.slots), 2048):
                    part = r.slots[s:s + 2048]
                    tier.write(part, random_slots(lay, len(part), gen))
                    tier.flush()
            tier.read(reqs[0].slots[:1])                        # every write is on disk
            times, read = _time(tier, reqs, cfg.reps)
            results.append(TierResult(f"disk ({cfg.disk_workers} workers)", read, times, peak))
        finally:
            if tier is not None:
                tier.close()
            os.rmdir(directory)
    return results


def markdown(cfg: AttentionBenchConfig, results: list[TierResult]) -> str:
    lines = [f"### {cfg.dtype} KV: slot {BlockLayout(cfg.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, group=cfg.kv_group_size).slot_bytes} bytes",
             "",
             f"decode attention, {cfg.batch} x {cfg.context} tokens x {cfg.layers} layers, "
             f"{cfg.num_kv_heads} KV heads x {cfg.group} x {cfg.head_dim} dims, {cfg.dtype}, "
             f"{cfg.threads} threads; median of {cfg.reps}",
             "",
             "| tier | KV read / step | time / step | effective GB/s | peak GB/s (measured) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.tier} | {r.kv_bytes / MiB:.0f} MiB | {statistics.median(r.seconds) * 1e3:.1f} ms "
                     f"| {r.gbs:.2f} | {r.peak_gbs:.2f} | {r.ratio:.2f} |")
    return "\n".join(lines)


def markdown_runs(runs: list[tuple[AttentionBenchConfig, list[TierResult]]]) -> str:
    """Each KV dtype's table, then the speed-up of each tier over the first dtype's (same run)."""
    parts = [markdown(cfg, res) for cfg, res in runs]
    if len(runs) > 1:
        base = {r.tier: statistics.median(r.seconds) for r in runs[0][1]}
        lines = [f"### speed-up over {runs[0][0].dtype} (time / step, same run)", "",
                 "| KV dtype | tier | time / step | KV read / step | speed-up |", "|---|---|---|---|---|"]
        for cfg, res in runs:
            for r in res:
                t = statistics.median(r.seconds)
                lines.append(f"| {cfg.dtype} | {r.tier} | {t * 1e3:.1f} ms | {r.kv_bytes / MiB:.0f} MiB "
                             f"| {base[r.tier] / t:.2f}x |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
