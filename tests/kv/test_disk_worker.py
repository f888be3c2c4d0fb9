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
    BlockCache,
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


def random_blocks(rng: np.random.Generator, slots: np.ndarray) -> WriteBlocks:
    """Random bf16 KV for ``slots``."""
    data = rng.standard_normal(len(slots) * LAYOUT.slot_elems).astype(np.float32)
    return WriteBlocks(np.asarray(slots, np.int64), (data.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def server(tmp_path, name: str, io: WorkerIO) -> DiskWorkerServer:
    s = DiskWorkerServer(str(tmp_path / f"{name}.kv"), LAYOUT, GROUP, 1, io)
    s.write(random_blocks(np.random.default_rng(0), np.arange(WRITTEN)))
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


@pytest.mark.parametrize("reader", ["aio", "threads"])
def test_read_ahead_given_while_an_attend_is_begun(tmp_path, reader):
    """A worker process starts the next layer's read-ahead between an attend's ``begin`` and
    its ``finish`` (the request and the hint arrive together): that read must not land in the
    buffer the begun attend reads its read-ahead blocks from. Each layer's partials stay those
    of a plain read, bit for bit, and the next layer still finds its blocks read ahead."""
    if reader == "aio":
        aio_or_skip()
    ref = server(tmp_path, "ref", WorkerIO(batch_bytes=1 << 30, reader="threads"))
    got = server(tmp_path, "got", WorkerIO(batch_bytes=1 << 16, ahead_bytes=1 << 20, reader=reader))
    rng = np.random.default_rng(4)
    reqs = [request(rng, layer) for layer in range(6)]
    try:
        got.prefetch(reqs[0])
        for i, r in enumerate(reqs):
            got.begin(r)
            if i + 1 < len(reqs):
                got.prefetch(reqs[i + 1])                   # reads the next layer's blocks now
            a, b = ref.attend(r), got.finish()
            assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse)
            assert b.ahead == len(r.slots)                  # every block of it was read ahead
    finally:
        for s in (ref, got):
            s.shard.close()


@pytest.mark.parametrize("reader", ["aio", "threads"])
def test_a_hint_that_fails_to_read_raises_nothing(tmp_path, reader):
    """A hint has no reply: a read-ahead that fails (here past the file's end) is dropped by the
    next hint without an error, the request that needs those blocks reports it, and the server
    goes on giving a plain read's partials."""
    if reader == "aio":
        aio_or_skip()
    ref = server(tmp_path, "ref", WorkerIO(batch_bytes=1 << 30, reader="threads"))
    got = server(tmp_path, "got", WorkerIO(batch_bytes=1 << 16, ahead_bytes=1 << 20, reader=reader))
    rng = np.random.default_rng(6)
    good = request(rng, 0)
    bad = replace(good, slots=good.slots + WRITTEN + 100)
    try:
        got.prefetch(bad)
        got.prefetch(good)                                  # drops the failed read-ahead quietly
        a, b = ref.attend(good), got.attend(good)
        assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse) and b.ahead == len(good.slots)
        got.prefetch(bad)
        with pytest.raises(DiskIOError, match="short read"):
            got.attend(bad)
        b = got.attend(good)
        assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse)
    finally:
        for s in (ref, got):
            s.shard.close()


def test_worker_loop_handles_a_hint_that_came_with_the_request(tmp_path):
    """The worker process's loop: an attend whose next layer's hint came with it, or is already
    in the pipe, starts that read-ahead before it computes; a write that follows the hint is
    still applied after the attend and before the next one (in the order sent), dropping the
    read-ahead it overwrites. Every reply equals an in-process server's that saw the same
    operations."""
    import multiprocessing as mp
    from dataclasses import asdict

    from kvoffload.kv.tiers.disk_worker import _serve

    ref = server(tmp_path, "ref", WorkerIO(batch_bytes=1 << 30, reader="threads"))
    rng = np.random.default_rng(5)
    r0, r1, r2 = (request(rng, layer) for layer in range(3))
    blocks = random_blocks(rng, np.arange(WRITTEN))
    rewrite = random_blocks(rng, np.unique(r1.slots)[:2])          # rewritten between the hint and r1
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    io = WorkerIO(batch_bytes=1 << 16, ahead_bytes=1 << 20)
    proc = ctx.Process(target=_serve, args=(theirs, str(tmp_path / "w.kv"), asdict(LAYOUT), GROUP, 1, asdict(io), True))
    proc.start()
    try:
        assert ours.recv()[0] == "ok"
        ours.send(("write", blocks))
        ref.write(blocks)
        assert ours.recv()[0] == "ok"
        for msg in [("prefetch", r0), ("attend", (r0, None)), ("prefetch", r1), ("write", rewrite),
                    ("attend", (r1, r2)), ("attend", (r2, None))]:
            ours.send(msg)                                          # all queued before the worker reads them
        want = [ref.attend(r0)]
        ref.write(rewrite)
        want += [ref.attend(r1), ref.attend(r2)]
        got = []
        for op in ("attend", "write", "attend", "attend"):
            status, payload = ours.recv()
            assert status == "ok", payload
            if op == "attend":
                got.append(payload)
        for a, b in zip(want, got):
            assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse)
        assert got[0].ahead == len(r0.slots) and got[2].ahead == len(r2.slots)
        ours.send(("close", None))
        assert ours.recv()[0] == "ok"
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        ref.shard.close()


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


def test_whole_reads_reuse_one_buffer_and_return_their_own_bytes(tmp_path):
    """``read`` (the prefill's read-back, gather) reads into one buffer kept between calls,
    grown when a read needs more: each call's bytes are its slots' (repeats and any order), a
    smaller read after a larger one and a larger one after it included, and an earlier result
    is not changed by a later read."""
    s = server(tmp_path, "reuse", WorkerIO())
    rng = np.random.default_rng(3)
    sb = LAYOUT.slot_bytes
    whole = s.read(np.arange(WRITTEN, dtype=np.int64))                 # every slot, in order
    try:
        first = None
        for n in (3, 40, 2, WRITTEN, 17):
            slots = rng.integers(0, WRITTEN, size=n).astype(np.int64)
            got = s.read(slots)
            want = b"".join(whole[i * sb:(i + 1) * sb] for i in slots)
            assert got == want, n
            if first is None:
                first, first_want = got, want
        assert first == first_want                                     # earlier results are copies
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


def steps_of(rng: np.random.Generator, steps: int, layers: int) -> list[AttendRequest]:
    """Decode-like traffic: every step visits the layers in order; each layer's selection keeps
    most of its previous step's blocks (a block cache's reason to exist)."""
    prev = {layer: request(rng, layer) for layer in range(layers)}
    out = []
    for s in range(steps):
        for layer in range(layers):
            r = prev[layer] if s % 3 else request(rng, layer)       # a new selection every third step
            out.append(AttendRequest(layer, rng.standard_normal(r.q.shape).astype(np.float32), r.seq, r.first,
                                     r.slots, r.masks))
            prev[layer] = r
    return out


@pytest.mark.parametrize("io", [
    WorkerIO(cache_bytes=1 << 30),                                   # everything fits
    WorkerIO(cache_bytes=24 * LAYOUT.disk_stride),                   # smaller than one step's blocks
    WorkerIO(batch_bytes=1, ahead_bytes=1 << 16, cache_bytes=40 * LAYOUT.disk_stride),   # with read-ahead hits
    WorkerIO(batch_bytes=1 << 16, read_blocks=4, cache_bytes=64 * LAYOUT.disk_stride),  # and read groups
], ids=["large", "small", "ahead", "rb4"])
@pytest.mark.parametrize("native", [True, False])
def test_block_cache_does_not_change_partials(tmp_path, io, native):
    """Sparse attends over a block cache (hits, misses, evictions, a rewrite of cached slots,
    the numpy path and the native kernel) give the partials of plain reads, bit for bit, and
    read fewer bytes once the cache is warm."""
    ref = server(tmp_path, "ref", WorkerIO(batch_bytes=1 << 30, reader="threads"))
    got = server(tmp_path, "got", io)
    if not native:
        got.kernel = ref.kernel = None
    rng = np.random.default_rng(2)
    reqs = steps_of(rng, 6, 3)
    read_ref = read_got = cached = 0
    for i, r in enumerate(reqs):
        if i == len(reqs) // 2:                                    # rewrite blocks the cache holds
            rewrite = random_blocks(rng, np.unique(r.slots)[:5])
            for s in (ref, got):
                s.write(rewrite)
        if io.ahead_bytes and i % 2 == 0:
            got.prefetch(reqs[(i + 1) % len(reqs)])
        a, b = ref.attend(r), got.attend(r)
        assert np.array_equal(a.o, b.o) and np.array_equal(a.lse, b.lse)
        read_ref, read_got, cached = read_ref + a.bytes_read, read_got + b.bytes_read, cached + b.cached
        assert b.cached + b.ahead <= len(r.slots)
    print(f"read {read_got} bytes against {read_ref} without the cache; {cached} blocks from it")
    assert cached > 0
    if not io.ahead_bytes and io.read_blocks == 1:
        assert read_got < read_ref
    for s in (ref, got):
        s.shard.close()


def test_block_cache_keeps_the_current_steps_blocks():
    """With more blocks a step than the cache holds, plain LRU would evict each block just
    before its next use; this cache keeps those it has and admits fewer new ones."""
    st = 16
    cache = BlockCache(4, st)
    src = np.arange(8 * st, dtype=np.uint8) // st              # row i is all i
    for step in range(3):
        for layer in range(2):
            cache.start(layer)
            want = np.arange(4, dtype=np.int64) + 10 * layer       # 4 blocks a layer, 8 a step
            held, pos = cache.lookup(want)
            if step == 0 and layer == 0:
                assert len(held) == 0
            miss = want[~np.isin(want, held)]
            cache.admit(miss, src, np.arange(len(miss), dtype=np.int64))
        # layer 0's blocks were admitted first and stay: layer 1 found no block it could evict
        assert sorted(cache.keys.tolist()) == [0, 1, 2, 3]
    view = np.frombuffer(cache.buf, np.uint8)[:4 * st].reshape(4, st)
    assert all((view[p] == k).all() for k, p in zip(cache.keys, cache.pos))   # the bytes of each slot
    cache.drop(np.array([2], np.int64))
    assert sorted(cache.keys.tolist()) == [0, 1, 3]
    cache.start(0)
    cache.start(0)                                   # a step later nothing is protected: LRU evicts
    cache.admit(np.array([7, 8], np.int64), src, np.array([5, 6], np.int64))
    assert len(cache.keys) == 4 and {7, 8} <= set(cache.keys.tolist())


def resident_is_consistent(cache: BlockCache) -> None:
    """``resident`` holds exactly the cached slots, each at its copy's address."""
    want = np.zeros(max(len(cache.resident), 1), np.int64)
    held = cache.key >= 0
    want[cache.key[held]] = cache.base + cache.stride * np.nonzero(held)[0]
    assert np.array_equal(cache.resident, want[:len(cache.resident)])
    assert not want[len(cache.resident):].any()


@pytest.mark.parametrize("cache_bytes", [0, 5 * LAYOUT.disk_stride, 40 * LAYOUT.disk_stride])
def test_fetch_gives_the_bytes_of_plain_reads(tmp_path, cache_bytes):
    """The direct sparse step's reads (DiskWorkerServer.fetch: a block's address from the cache's
    ``resident`` array, else read into staging and filled in, then admitted): every address
    holds the slot's bytes as read() returns them, over steps of several layers with a block
    of two sequences, evictions and a rewritten slot; exactly the blocks not held are read, and
    ``resident`` always mirrors the cache."""
    import ctypes

    s = server(tmp_path, "fetch", WorkerIO(cache_bytes=cache_bytes))
    rng = np.random.default_rng(3)
    sb, st = LAYOUT.slot_bytes, LAYOUT.disk_stride
    hits = 0
    for step in range(6):
        for layer in range(3):
            slots = rng.choice(WRITTEN, size=12, replace=False).astype(np.int64)
            slots = np.concatenate([slots, slots[:2]])                  # a block of two sequences
            ptrs = np.full(40, -1, np.int64)                              # (other items' addresses)
            refs = np.sort(rng.choice(40, size=len(slots), replace=False)).astype(np.int64)
            res = s.cache.resident if s.cache is not None else np.zeros(0, np.int64)
            held = np.zeros(len(slots), np.int64)
            inside = slots < len(res)
            held[inside] = res[slots[inside]]
            ptrs[refs] = held                                             # what kvo_sparse_plan writes
            read, cached = s.fetch(layer, slots, ptrs, refs)
            assert cached == int(np.count_nonzero(held))
            assert read == len(np.unique(slots[held == 0])) * st
            assert (ptrs[np.setdiff1d(np.arange(40), refs)] == -1).all()   # only the refs are touched
            got = b"".join(ctypes.string_at(int(a), sb) for a in ptrs[refs])
            assert got == s.read(slots)
            hits += cached
            if s.cache is not None:
                resident_is_consistent(s.cache)
        if step == 3 and s.cache is not None:                          # a cached slot rewritten: dropped
            victim = int(s.cache.keys[0])
            s.write(WriteBlocks(np.array([victim], np.int64), bytes(sb)))
            assert s.cache.resident[victim] == 0
            resident_is_consistent(s.cache)
    assert (hits > 0) == (cache_bytes > 0)
    s.shard.close()
