"""Where each full block lives, and what spills when a tier's budget is full (no data moves
here: placement is the *prepare* phase; it returns :class:`Move` records that the backend
*completes* by copying bytes, in order).

Policy: a new block goes to the fastest tier; if that tier is full, its oldest block that is
neither an attention sink nor in the recent window is demoted one tier down (recursively), so
sinks and recent blocks stay fast. If a tier has nothing left to demote, the new block goes to
the next tier. When every tier is full the request cannot proceed (:class:`KVBudgetExceeded`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvoffload.errors import KvoffloadError

Key = tuple[int, int, int]             # (seq_id, layer, block index)


class KVBudgetExceeded(KvoffloadError):
    """Every tier is full."""


@dataclass(frozen=True)
class Loc:
    """A block's home: tier level (0 = device, 1 = host, 2 = disk), disk shard, slot."""

    level: int
    shard: int
    slot: int


@dataclass(frozen=True)
class Move:
    """Copy block ``key`` from ``src`` (``None``: from the sequence's tail buffer) to ``dst``."""

    key: Key
    src: Loc | None
    dst: Loc


class SlotPool:
    """Slot numbers of one tier (or disk shard) within a capacity (``None`` = unlimited)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity, self.used, self._free, self._next = capacity, 0, [], 0

    def has_room(self) -> bool:
        return self.capacity is None or self.used < self.capacity

    def alloc(self) -> int:
        self.used += 1
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def free(self, slot: int) -> None:
        self.used -= 1
        self._free.append(slot)


class Level:
    """One tier: its shards' slot pools (one unless disk) and the blocks it may demote."""

    def __init__(self, name: str, pools: list[SlotPool], capacity: int | None) -> None:
        self.name, self.pools, self.capacity = name, pools, capacity
        self.used = 0
        self.evictable: OrderedDict[Key, None] = OrderedDict()
        self._rr = 0

    def has_room(self) -> bool:
        return (self.capacity is None or self.used < self.capacity) and any(p.has_room() for p in self.pools)

    def alloc(self, level: int) -> Loc:
        for _ in range(len(self.pools)):                    # round-robin over shards
            shard = self._rr
            self._rr = (self._rr + 1) % len(self.pools)
            if self.pools[shard].has_room():
                self.used += 1
                return Loc(level, shard, self.pools[shard].alloc())
        raise KVBudgetExceeded(self.name)

    def release(self, loc: Loc) -> None:
        self.used -= 1
        self.pools[loc.shard].free(loc.slot)


class Placement:
    """Block tables of every sequence (per layer: block index -> :class:`Loc`) plus the levels."""

    def __init__(self, levels: list[Level], sink_blocks: int, recent_blocks: int) -> None:
        self.levels, self.sink_blocks, self.recent_blocks = levels, sink_blocks, recent_blocks
        self.tables: dict[int, list[list[Loc]]] = {}
        self.stamp: dict[tuple[int, int], int] = {}         # (seq, layer) -> changes so far (caches)

    def add_seq(self, seq_id: int, num_layers: int) -> None:
        self.tables[seq_id] = [[] for _ in range(num_layers)]

    def remove_seq(self, seq_id: int) -> None:
        for layer, locs in enumerate(self.tables.pop(seq_id, [])):
            for i, loc in enumerate(locs):
                lv = self.levels[loc.level]
                lv.release(loc)
                lv.evictable.pop((seq_id, layer, i), None)
            self.stamp.pop((seq_id, layer), None)

    def place_new(self, seq_id: int, layer: int) -> list[Move]:
        """The next full block of (seq, layer), from its tail: the moves to perform, in order."""
        locs = self.tables[seq_id][layer]
        n = len(locs)
        key = (seq_id, layer, n)
        old = n - self.recent_blocks                  # the block that leaves the recent window now
        if self.sink_blocks <= old < n:
            self.levels[locs[old].level].evictable[(seq_id, layer, old)] = None
        moves: list[Move] = []
        loc = self._room(0, moves, key)
        moves.append(Move(key, None, loc))
        locs.append(loc)
        if old == n and n >= self.sink_blocks:        # no recent window: evictable at once
            self.levels[loc.level].evictable[key] = None
        self._touch(seq_id, layer)
        return moves

    def drop_from(self, seq_id: int, layer: int, n: int) -> None:
        """Release blocks ``n ..`` of (seq, layer) (a truncated sequence): their slots are free."""
        locs = self.tables[seq_id][layer]
        while len(locs) > n:
            i = len(locs) - 1
            loc = locs.pop()
            lv = self.levels[loc.level]
            lv.release(loc)
            lv.evictable.pop((seq_id, layer, i), None)
        self._touch(seq_id, layer)

    def _touch(self, seq_id: int, layer: int) -> None:
        self.stamp[(seq_id, layer)] = self.stamp.get((seq_id, layer), 0) + 1

    def _room(self, level: int, moves: list[Move], key: Key) -> Loc:
        """A free slot at ``level`` or below, demoting (appending moves) where needed."""
        for lv_i in range(level, len(self.levels)):
            lv = self.levels[lv_i]
            if lv.has_room():
                return lv.alloc(lv_i)
            if lv.evictable and lv_i + 1 < len(self.levels):
                vkey, _ = lv.evictable.popitem(last=False)
                vsid, vlayer, vidx = vkey
                src = self.tables[vsid][vlayer][vidx]
                dst = self._room(lv_i + 1, moves, vkey)      # deeper moves are listed first
                moves.append(Move(vkey, src, dst))
                self.tables[vsid][vlayer][vidx] = dst
                self._touch(vsid, vlayer)
                lv.release(src)
                self.levels[dst.level].evictable[vkey] = None
                return lv.alloc(lv_i)
        raise KVBudgetExceeded(self._full_message())

    def _full_message(self) -> str:
        parts = [f"{lv.name} {lv.used} blocks" for lv in self.levels]
        return "KV cache does not fit in the tier budgets (full: " + ", ".join(parts) + ")"
