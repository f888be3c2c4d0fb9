"""The disk worker in-process: scattered sparse reads through small batches, aligned read groups,
read-ahead hits and misses, every I/O depth and both readers (native AIO, a thread pool) give
the partials of one plain read of exactly the chosen blocks, bit for bit (the same kernel over
the same items)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kvoffload.kernels.aio import AioReader
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk_worker import (
    DiskIOError,
    DiskShard,
    DiskWorkerServer,
    WorkerIO,
    WriteBlocks,
)
from kvoffload.kv.tiers.protocol import AttendRequest

LAYOUT = BlockLayout(block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16", chunk_blocks=8)
GROUP = 2                                   # query heads per KV head
CHUNKS = 12
WRITTEN = CHUNKS * LAYOUT.chunk_blocks - 3          # the last chunk not full: read groups past the end


def request(rng: np.random.Generator, layer: int) -> AttendRequest:
    """Two sequences, each attending a random subset of the blocks of six chunks (sparse:
    per-(block, head) token masks, some heads skipping a block)."""
    seq, first, slots, masks = [], [0], [], []
    for b in range(2):
        for c in range(6 * b, 6 * b + 6):
            written = min(LAYOUT.chunk_blocks, WRITTEN - c * LAYOUT.chunk_blocks)
            chosen = np.sort(rng.choice(written, size=rng.integers(1, 5), replace=False))
            slots.append(c * LAYOUT.chunk_blocks + chosen)
            m = rng.integers(0, 1 << 16, size=(len(chosen), LAYOUT.num_kv_heads), dtype=np.uint64)
            masks.append(m)
            seq.append(b)
            first.append(first[-1] + len(chosen))
    q = rng.standard_normal((2, 1, LAYOUT.num_kv_heads * GROUP, LAYOUT.head_dim)).astype(np.float32)
    return AttendRequest(layer, q, np.array(seq, np.int64), np.array(first, np.int64), np.concatenate(slots),
                         np.concatenate(masks))


def server(tmp_path, name: str, io: WorkerIO) -> DiskWorkerServer:
    s = DiskWorkerServer(str(tmp_path / f"{name}.kv"), LAYOUT, GROUP, 1, io)
    rng = np.random.default_rng(0)
    n = WRITTEN
    data = rng.standard_normal(n * LAYOUT.slot_elems).astype(np.float32)
    bf16 = (data.view(np.uint32) >> 16).astype(np.uint16)
    s.write(WriteBlocks(np.arange(n, dtype=np.int64), bf16.tobytes()))
    return s


@pytest.mark.parametrize("io", [
    WorkerIO(batch_bytes=1 << 20, read_blocks=2),
    WorkerIO(batch_bytes=1, read_blocks=4),                 # one chunk a batch: groups outgrow the chosen blocks
    WorkerIO(batch_bytes=1, read_blocks=8, io_depth=1),
    WorkerIO(batch_bytes=1, ahead_bytes=1, read_blocks=1, io_depth=16),
    WorkerIO(batch_bytes=1 << 16, ahead_bytes=1 << 16, read_blocks=4),
], ids=["rb2", "rb4-small-batches", "rb8-depth1", "ahead-depth16", "rb4-ahead"])
@pytest.mark.parametrize("reader", ["aio", "threads"])
def test_reads_do_not_change_partials(tmp_path, io, reader):
    if reader == "aio":
        aio_or_skip()
    ref = server(tmp_path, "ref", WorkerIO(batch_bytes=1 << 30, reader="threads"))
    got = server(tmp_path, "got", replace(io, reader=reader))
    assert got.shard.reader == reader
    rng = np.random.default_rng(1)
    reqs = [request(rng, layer) for layer in range(4)]
    for i, r in enumerate(reqs):
        if io.ahead_bytes:                                  # a right guess for even layers, a wrong one for odd
            got.prefetch(r if i % 2 == 0 else reqs[(i + 1) % len(reqs)])
        a, b = ref.attend(r), got.attend(r)
        assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse)
        assert b.bytes_read >= a.bytes_read * (io.read_blocks > 1)
        if io.ahead_bytes and i % 2 == 0:
            assert b.ahead > 0
    for s in (ref, got):
        s.shard.close()


def aio_or_skip() -> None:
    try:
        AioReader().close()
    except OSError as e:
        pytest.skip(f"native AIO unavailable here: {e}")


@pytest.mark.parametrize("reader", ["aio", "threads"])
def test_read_past_the_end_is_a_disk_error(tmp_path, reader):
    """A read the file cannot satisfy is a one-line DiskIOError naming the file (never a hang or
    a half-filled buffer taken as data)."""
    if reader == "aio":
        aio_or_skip()
    s = server(tmp_path, reader, WorkerIO(reader=reader))
    try:
        with pytest.raises(DiskIOError, match=r"short read from .*\.kv"):
            s.read(np.array([WRITTEN + 5], np.int64))
        assert len(s.read(np.array([0, WRITTEN - 1], np.int64))) == 2 * LAYOUT.slot_bytes   # still usable
    finally:
        s.shard.close()


def test_auto_reader_and_unknown_reader(tmp_path):
    """auto: AIO on an O_DIRECT file, threads on a buffered one (AIO would run synchronously)."""
    aio_or_skip()
    direct, buffered = DiskShard(str(tmp_path / "a.kv"), LAYOUT), DiskShard(str(tmp_path / "b.kv"), LAYOUT, direct=False)
    try:
        if not direct.direct:
            pytest.skip("no O_DIRECT on this filesystem")
        assert (direct.reader, buffered.reader) == ("aio", "threads")
    finally:
        direct.close()
        buffered.close()
    with pytest.raises(DiskIOError, match="unknown disk reader 'fast'"):
        DiskShard(str(tmp_path / "c.kv"), LAYOUT, reader="fast")
