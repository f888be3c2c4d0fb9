"""Placement: budgets are never exceeded, sink chunks and the recent window stay in the fast tier,
a chunk's blocks stay together, moves are ordered so a freed chunk is copied out before it is
reused; the disk shard round-trips its slots."""

from __future__ import annotations

import numpy as np
import pytest

from kvoffload.config import KVConfig, parse_size, parse_tiers
from kvoffload.errors import ConfigError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.placement import KVBudgetExceeded, Placement
from kvoffload.kv.tiers.disk_worker import DiskShard, aligned_buffer
from kvoffload.kv.tiers.protocol import ChunkPool, PooledChunks

CB = 2


class FakeTier(PooledChunks):
    def __init__(self, name: str, capacity: int | None) -> None:        # chunk numbers only
        self.name, self.pool = name, ChunkPool(capacity)


def make(caps, sink=1, recent=2):
    return Placement([FakeTier(n, c) for n, c in zip(("device", "host", "disk"), caps)], CB, sink, recent)


def simulate(p, seqs, layers, blocks):
    """Replays the moves on a dict of slot contents and checks every block's data."""
    store = {}
    for sid in seqs:
        p.add_seq(sid, layers)
    for _ in range(blocks):
        for sid in seqs:
            for layer in range(layers):
                moves, loc, i = p.place_block(sid, layer)
                for m in moves:
                    for j in range(m.blocks):
                        store[(m.dst.tier, m.dst.chunk, j)] = store[(m.src.tier, m.src.chunk, j)]
                n = p.blocks[sid][layer] - 1
                store[(loc.tier, loc.chunk, i)] = (sid, layer, n)
                for t in p.tiers:
                    assert t.pool.capacity is None or t.used <= t.pool.capacity
    for sid in seqs:
        for layer in range(layers):
            for n in range(p.blocks[sid][layer]):
                loc = p.tables[sid][layer][n // CB]
                assert store[(loc.tier, loc.chunk, n % CB)] == (sid, layer, n)
    return store


def test_budgets_hold_and_data_follows_moves():
    p = make([3, 5, None])
    simulate(p, [0, 1], 2, 9)                      # 2 seqs x 2 layers x 5 chunks
    assert [t.used for t in p.tiers] == [3, 5, 2 * 2 * 5 - 8]


def test_hot_layers_leave_the_fast_tier_last():
    """The chunks of a hot layer (a sparse policy's dense layer, read whole every step) are
    demoted only when the tier has no other chunk to demote; data still follows every move."""
    p = Placement([FakeTier(n, c) for n, c in zip(("host", "disk"), (8, None))], CB, 0, 0, frozenset({0}))
    simulate(p, [0], 2, 8)                         # 2 layers x 4 chunks: 8 chunks fit in host
    assert all(loc.tier == 0 for layer in (0, 1) for loc in p.tables[0][layer])
    simulate_more = [p.place_block(0, 1) for _ in range(4)]                 # 2 more chunks of layer 1
    assert all(loc.tier == 0 for loc in p.tables[0][0])                     # layer 0 stays
    assert [loc.tier for loc in p.tables[0][1]] == [1, 1, 0, 0, 0, 0]       # layer 1's oldest went down
    assert all(not m for m, _, _ in simulate_more[1::2])
    cold = make([4, None], sink=0, recent=0)
    simulate(cold, [0], 2, 8)                      # without hot layers both layers spill alike
    assert {loc.tier for loc in cold.tables[0][0]} == {0, 1}
    hot = Placement([FakeTier(n, c) for n, c in zip(("host", "disk"), (2, None))], CB, 0, 0, frozenset({0}))
    simulate(hot, [0], 1, 8)                       # only hot chunks: they are demoted oldest first
    assert [loc.tier for loc in hot.tables[0][0]] == [1, 1, 0, 0]


def test_sinks_and_recent_stay_fast():
    p = make([4, None, None], sink=1, recent=2)
    simulate(p, [0], 2, 12)
    for layer in range(2):
        locs = p.tables[0][layer]
        assert locs[0].tier == 0 and locs[-1].tier == 0             # sink chunk and the newest
        assert all(loc.tier == 1 for loc in locs[1:-1])


def test_all_full_raises():
    p = make([1, 1, 0], sink=0, recent=0)
    p.add_seq(0, 1)
    for _ in range(2 * CB):
        p.place_block(0, 0)
    with pytest.raises(KVBudgetExceeded, match="does not fit"):
        p.place_block(0, 0)


def test_drop_from_releases_whole_chunks():
    p = make([None, None, None])
    simulate(p, [0], 1, 7)                          # 4 chunks, the last half full
    p.drop_from(0, 0, 3)                            # keeps chunks 0 and 1 (block 2 is chunk 1's first)
    assert p.tiers[0].used == 2 and p.blocks[0][0] == 3
    p.remove_seq(0)
    assert p.tiers[0].used == 0


def test_parse_size_and_tiers():
    assert parse_size("256MiB") == 256 << 20 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("0") == 0 and parse_size("none") is None and parse_size("4096") == 4096
    assert parse_tiers("host:64MiB, disk:none") == (("host", 64 << 20), ("disk", None))
    with pytest.raises(ConfigError, match="bad size"):
        parse_size("12XB")
    with pytest.raises(ConfigError, match="twice"):
        parse_tiers("host:1MiB,host:2MiB")
    with pytest.raises(ConfigError, match="block_size"):
        KVConfig(block_size=0)


def test_disk_shard_roundtrip(tmp_path):
    lay = BlockLayout(16, 3, 64, "bfloat16")
    shard = DiskShard(str(tmp_path / "s.kv"), lay)
    data = np.random.default_rng(0).integers(0, 2**16, size=(5, lay.slot_elems), dtype=np.uint16)
    slots = np.array([7, 2, 3, 4, 9])
    shard.write(slots, memoryview(data.tobytes()), aligned_buffer(5 * lay.disk_stride))
    buf = aligned_buffer(5 * lay.disk_stride)
    order = np.argsort(slots)
    assert shard.read(slots[order], buf) == 5 * lay.disk_stride
    got = np.frombuffer(buf, dtype=np.uint16, count=5 * lay.disk_stride // 2).reshape(5, -1)[:, :lay.slot_elems]
    assert np.array_equal(got, data[order])
    assert DiskShard.runs(np.array([2, 3, 4, 7, 9])) == [(2, 3, 0), (7, 1, 3), (9, 1, 4)]
    assert oct(__import__("os").stat(tmp_path / "s.kv").st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("probe", ["real", "refused"])
def test_compressed_slots_on_disk_unpadded(tmp_path, monkeypatch, probe):
    """An int8 block (7104 bytes for SmolLM2) takes 7168 bytes on disk, not two pages: its slots
    are O_DIRECT-aligned, not page-aligned (what this filesystem's probe says decides O_DIRECT;
    a filesystem that refuses it, as a 4 KiB-sector disk would, gets buffered I/O), and read back
    exactly, alone (scattered, as sparse decode reads) and in runs (as dense decode does)."""
    import kvoffload.kv.tiers.disk_worker as dw

    lay = BlockLayout(16, 3, 64, "int8")
    assert (lay.slot_bytes, lay.disk_stride, lay.page_stride) == (7104, 7168, 8192)
    if probe == "refused":
        monkeypatch.setattr(dw, "direct_io_at", lambda directory, align: False)
    shard = DiskShard(str(tmp_path / "s.kv"), lay)
    print(f"O_DIRECT: {shard.direct} ({probe})")
    assert shard.direct == (probe == "real" and dw.direct_io_at(str(tmp_path), 1024))
    n, st = 40, lay.disk_stride
    data = np.random.default_rng(1).integers(0, 256, size=(n, lay.slot_bytes), dtype=np.uint8)
    slots = np.random.default_rng(2).permutation(n)
    shard.write(slots, memoryview(data.tobytes()), aligned_buffer(n * st))
    assert shard.extent() == n
    inv = np.argsort(slots)                                   # slot s holds data[inv[s]]
    for want in (np.array([3]), np.array([0, 5, 6, 7, 21, 39]), np.arange(n)):
        buf = aligned_buffer(len(want) * st)
        assert shard.read(want, buf, max_bytes=3 * st) == len(want) * st
        got = np.frombuffer(buf, np.uint8, count=len(want) * st).reshape(len(want), st)[:, :lay.slot_bytes]
        assert np.array_equal(got, data[inv[want]])


def test_layout_pack_roundtrip_torch_and_numpy():
    """The one slot transform: pack / unpack / write_range agree, on torch tensors and numpy arrays."""
    import torch

    lay = BlockLayout(4, 2, 8, "float32", chunk_blocks=2)
    k, v = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    slots = lay.pack(k, v)
    k2, v2 = lay.unpack(slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    kn, vn = lay.unpack(slots.numpy(), 10)
    assert np.array_equal(kn, k[:, :10].numpy()) and np.array_equal(vn, v[:, :10].numpy())
    arr = torch.zeros(4, lay.slot_elems)
    lay.write_range(arr, 3, k[:, 3:11], v[:, 3:11])                   # unaligned start and end
    k3, v3 = lay.unpack(arr[:3], 11)
    assert torch.equal(k3[:, 3:], k[:, 3:11]) and torch.equal(v3[:, 3:], v[:, 3:11])
    first, chunk = lay.chunk_runs(np.array([0, 1, 2, 5, 6, 7, 8]))
    assert first.tolist() == [0, 2, 3, 4, 6, 7] and chunk.tolist() == [0, 1, 2, 3, 4]


def place(p, order):
    """Place one block of (seq 0, layer) for each layer in ``order``, replaying moves on a dict
    of slot contents; checks that each move carries exactly the blocks written, and every
    block's data at the end. Returns the moves."""
    store, moves = {}, []
    for layer in order:
        ms, loc, i = p.place_block(0, layer)
        for m in ms:
            assert m.blocks == min(CB, p.blocks[0][m.key[1]] - m.key[2] * CB)
            for j in range(m.blocks):
                store[(m.dst.tier, m.dst.chunk, j)] = store[(m.src.tier, m.src.chunk, j)]
        moves += ms
        store[(loc.tier, loc.chunk, i)] = (layer, p.blocks[0][layer] - 1)
    for layer, n_blocks in enumerate(p.blocks[0]):
        for n in range(n_blocks):
            loc = p.tables[0][layer][n // CB]
            assert store[(loc.tier, loc.chunk, n % CB)] == (layer, n)
    return moves


def test_cached_layers_give_their_room_to_hot_layers():
    """With a block cache below, a sparse layer's chunks have no sink / recent protection and
    leave the fast tier first, even the one being filled (moved with only its written blocks);
    the hot layer keeps the fast tier, and every block's data follows its moves."""
    def two_tiers(host):
        return Placement([FakeTier(n, c) for n, c in zip(("host", "disk"), (host, None))], CB, 1, 4,
                         hot_layers=frozenset({0}), cached_layers=frozenset({1}))

    p = two_tiers(6)
    p.add_seq(0, 2)
    place(p, [0, 1] * 9)                                             # 5 chunks a layer, the last half full
    assert [loc.tier for loc in p.tables[0][0]] == [0] * 5          # the hot layer stays whole
    assert [loc.tier for loc in p.tables[0][1]] == [1, 1, 1, 1, 0]  # sink and recent chunks too went down
    pinned = make([6, None], sink=1, recent=4)
    simulate(pinned, [0], 2, 9)                                     # without: sinks and recent stay
    assert pinned.tables[0][1][0].tier == 0 and pinned.tables[0][1][-1].tier == 0
    p = two_tiers(2)
    p.add_seq(0, 2)
    moves = place(p, [1, 0, 0, 0, 1, 1])          # the cached chunk is demoted with 1 of its 2 blocks
    assert [m.blocks for m in moves] == [1] and [loc.tier for loc in p.tables[0][1]] == [1, 1]


def test_shared_chunks_are_refcounted():
    """A shared chunk (prefix sharing) is allocated once, stays while any user holds it (its
    source removed first), is queued for demotion once, moves for every user when demoted, and
    is released with its last user."""
    host, disk = FakeTier("host", 6), FakeTier("disk", None)
    p = Placement([host, disk], CB, 0, 0)
    p.add_seq(0, 1)
    for _ in range(3 * CB):                       # the source: 3 full chunks
        p.place_block(0, 0)
    for sid in (1, 2):
        p.add_seq(sid, 1)
        p.share(sid, 0, 0, 2)
    assert host.used == 3 and p.tables[1][0] == p.tables[2][0] == p.tables[0][0][:2]
    assert sorted(k for k in p.evictable[0]) == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]     # each chunk once
    with pytest.raises(ValueError):
        p.share(1, 0, 0, 1)                       # a sequence that holds blocks already
    p.remove_seq(0)
    assert host.used == 2 and len(p.users) == 2   # the source's own chunk released, the shared kept
    for _ in range(6 * CB):                       # sequence 1 grows past the host: the shared chunks go down
        p.place_block(1, 0)
    assert p.tables[1][0][:2] == p.tables[2][0] and all(loc.tier == 1 for loc in p.tables[2][0])
    p.remove_seq(1)
    assert disk.used == 2 and host.used == 0 and not p.users     # sequence 2 still holds them
    p.remove_seq(2)
    assert host.used == disk.used == 0 and not any(p.evictable)
