"""Placement: budgets are never exceeded, sinks and the recent window stay in the fast tier,
moves are ordered so a freed slot is copied out before it is reused."""

from __future__ import annotations

import numpy as np
import pytest

from kvoffload.config import KVConfig, parse_size
from kvoffload.errors import ConfigError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.placement import KVBudgetExceeded, Level, Placement, SlotPool
from kvoffload.kv.tiers.disk import DiskShard, aligned_buffer


def make(caps, sink=1, recent=2):
    levels = [Level(n, [SlotPool(c)], c) for n, c in zip(("device", "host", "disk"), caps)]
    return Placement(levels, sink, recent)


def simulate(p, seqs, layers, blocks):
    """Replays the moves on a dict of slot contents and checks every block's data."""
    store = {}
    for sid in seqs:
        p.add_seq(sid, layers)
    for _ in range(blocks):
        for sid in seqs:
            for layer in range(layers):
                for m in p.place_new(sid, layer):
                    src = ("new", m.key) if m.src is None else store[(m.src.level, m.src.shard, m.src.slot)]
                    store[(m.dst.level, m.dst.shard, m.dst.slot)] = src
                for lv in p.levels:
                    assert lv.capacity is None or lv.used <= lv.capacity
    for sid in seqs:
        for layer in range(layers):
            for idx, loc in enumerate(p.tables[sid][layer]):
                assert store[(loc.level, loc.shard, loc.slot)] == ("new", (sid, layer, idx))
    return store


def test_budgets_hold_and_data_follows_moves():
    p = make([3, 5, None])
    simulate(p, [0, 1], 2, 9)
    assert [lv.used for lv in p.levels] == [3, 5, 2 * 2 * 9 - 8]


def test_sinks_and_recent_stay_fast():
    p = make([4, None, None], sink=1, recent=1)
    simulate(p, [0], 2, 10)
    for layer in range(2):
        locs = p.tables[0][layer]
        assert locs[0].level == 0 and locs[-1].level == 0           # sink and the newest block
        assert all(loc.level == 1 for loc in locs[1:-1])


def test_all_full_raises():
    p = make([1, 1, 0], sink=0, recent=0)
    p.add_seq(0, 1)
    p.place_new(0, 0)
    p.place_new(0, 0)
    with pytest.raises(KVBudgetExceeded, match="does not fit"):
        p.place_new(0, 0)


def test_parse_size():
    assert parse_size("256MiB") == 256 << 20 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("0") == 0 and parse_size("none") is None and parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="bad size"):
        parse_size("12XB")
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
