"""Where each chunk lives, and what spills when a tier's budget is full. No data moves here:
placement is the *prepare* phase; it returns :class:`Move` records that the block store
*completes* by copying bytes, in order.

The unit is the chunk (``chunk_blocks`` consecutive blocks of one (sequence, layer)): a chunk's
blocks all live in one tier, in consecutive slots. A new chunk goes to the fastest tier with
room; if that tier is full, its oldest chunk that is neither a sink chunk (it holds attention
sink tokens) nor touched by the recent window is demoted one tier down (recursively), so sinks
and recent tokens stay fast. Chunks of *hot* layers (read whole at every decode step while the
others are read in part: the dense layers of a sparse policy) are demoted only when a tier has
no other chunk to demote — per byte they are read many times more often (FlexGen's placement
by access frequency, at chunk granularity). Chunks of *cached* layers (the sparse layers, when
the disk tier keeps a cache of the blocks they read) have no sink or recent-window protection
and may be demoted while still being filled: a sparse step reads a few blocks of those chunks,
which that cache holds block by block, so their room in the fast tier is better spent on the
hot layers. If a tier has nothing left to demote, the new chunk goes to the next tier. When
every tier is full the request cannot proceed (:class:`KVBudgetExceeded`).

Sequences with a common prompt prefix *share* its full chunks (:meth:`Placement.share`): each
sharer's table refers to the same chunk of the same tier, which holds it (and counts against
the tier's budget) once; it is demotable when any of its users marks it so, a demotion moves it
for every user, and it is released when its last user is removed (a reference count: its list
of users).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from kvoffload.errors import KvoffloadError

Key = tuple[int, int, int]             # (seq_id, layer, chunk index)


class KVBudgetExceeded(KvoffloadError):
    """Every tier is full."""


class ChunkAllocator(Protocol):
    """What placement needs of a tier."""

    name: str

    @property
    def used(self) -> int: ...
    def has_room(self) -> bool: ...
    def alloc(self) -> int: ...
    def release(self, chunk: int) -> None: ...


@dataclass(frozen=True)
class Loc:
    """A chunk's home: the tier's position in the ordered list, and the tier's chunk number."""

    tier: int
    chunk: int


@dataclass(frozen=True)
class Move:
    """Copy the first ``blocks`` blocks of chunk ``key`` from ``src`` to ``dst``."""

    key: Key
    src: Loc
    dst: Loc
    blocks: int


class Placement:
    """Chunk tables of every sequence (per layer: chunk index -> :class:`Loc`), blocks placed
    per (sequence, layer), and per tier the chunks it may demote (oldest first; those of
    ``hot_layers`` after all others)."""

    def __init__(self, tiers: list[ChunkAllocator], chunk_blocks: int, sink_chunks: int, recent_blocks: int,
                 hot_layers: frozenset[int] = frozenset(), cached_layers: frozenset[int] = frozenset()) -> None:
        self.tiers, self.cb = tiers, chunk_blocks
        self.sink_chunks, self.recent_blocks = sink_chunks, recent_blocks
        self.hot_layers, self.cached_layers = hot_layers, cached_layers
        self.tables: dict[int, list[list[Loc]]] = {}
        self.blocks: dict[int, list[int]] = {}              # seq -> per layer full blocks placed
        self.evictable: list[OrderedDict[Key, None]] = [OrderedDict() for _ in tiers]
        self.evictable_hot: list[OrderedDict[Key, None]] = [OrderedDict() for _ in tiers]
        self._marked: dict[tuple[int, int], int] = {}       # (seq, layer) -> chunks made evictable
        self.stamp: dict[tuple[int, int], int] = {}         # (seq, layer) -> changes so far (caches)
        # a chunk shared by several sequences: (tier, chunk) -> its users' keys (2 or more; the
        # first is the one it is queued under, when it is demotable)
        self.users: dict[tuple[int, int], list[Key]] = {}

    def _queue(self, tier: int, layer: int) -> OrderedDict[Key, None]:
        """Where a demotable chunk of ``layer`` in ``tier`` waits."""
        return (self.evictable_hot if layer in self.hot_layers else self.evictable)[tier]

    def add_seq(self, seq_id: int, num_layers: int) -> None:
        self.tables[seq_id] = [[] for _ in range(num_layers)]
        self.blocks[seq_id] = [0] * num_layers

    def remove_seq(self, seq_id: int) -> None:
        for layer, locs in enumerate(self.tables.pop(seq_id, [])):
            for c, loc in enumerate(locs):
                self._release((seq_id, layer, c), loc)
            self.stamp.pop((seq_id, layer), None)
            self._marked.pop((seq_id, layer), None)
        self.blocks.pop(seq_id, None)

    def share(self, seq_id: int, source: int, layer: int, chunks: int) -> None:
        """The first ``chunks`` chunks of (source, layer) (full ones) become those of (seq,
        layer), which holds nothing yet: referenced, not copied (no moves, no tier room)."""
        locs = self.tables[seq_id][layer]
        if locs or self.blocks[source][layer] < chunks * self.cb:
            raise ValueError(f"share: sequence {seq_id} holds blocks, or sequence {source} has fewer than "
                             f"{chunks} full chunks in layer {layer}")
        for c, loc in enumerate(self.tables[source][layer][:chunks]):
            self.users.setdefault((loc.tier, loc.chunk), [(source, layer, c)]).append((seq_id, layer, c))
            locs.append(loc)
        self.blocks[seq_id][layer] = chunks * self.cb
        self._mark(seq_id, layer)
        self._touch(seq_id, layer)

    def _release(self, key: Key, loc: Loc) -> None:
        """(seq, layer, c) no longer uses its chunk ``loc``: the tier's chunk is released unless
        another sequence shares it (then it stays, demotable under another user's key if it was)."""
        queue = self._queue(loc.tier, key[1])
        users = self.users.get((loc.tier, loc.chunk))
        if users is None:
            self.tiers[loc.tier].release(loc.chunk)
            queue.pop(key, None)
            return
        users.remove(key)
        if key in queue:
            del queue[key]
            queue[users[0]] = None
        if len(users) == 1:
            del self.users[(loc.tier, loc.chunk)]

    def place_block(self, seq_id: int, layer: int) -> tuple[list[Move], Loc, int]:
        """The next full block of (seq, layer): the moves to complete first (in order), then the
        chunk it goes to and its index in that chunk."""
        locs = self.tables[seq_id][layer]
        n = self.blocks[seq_id][layer]
        c, i = divmod(n, self.cb)
        moves: list[Move] = []
        if i == 0:                                          # a new chunk
            locs.append(self._room(0, moves))
        self.blocks[seq_id][layer] = n + 1
        self._mark(seq_id, layer)
        self._touch(seq_id, layer)
        return moves, locs[c], i

    def _pins(self, layer: int, n: int) -> tuple[int, int]:
        """For ``layer`` with ``n`` blocks: (sink chunks, chunks before the recent window) — the
        chunks in between may be demoted (in a cached layer, every chunk, the one being filled too)."""
        if layer in self.cached_layers:
            return 0, -(-n // self.cb)
        return self.sink_chunks, max(0, n - self.recent_blocks) // self.cb

    def _mark(self, seq_id: int, layer: int) -> None:
        """Chunks past the sinks and before the recent window (:meth:`_pins`) may be demoted."""
        n = self.blocks[seq_id][layer]
        sink, ready = self._pins(layer, n)
        done = self._marked.get((seq_id, layer), sink)
        locs = self.tables[seq_id][layer]
        for c in range(max(done, sink), ready):
            queue = self._queue(locs[c].tier, layer)
            users = self.users.get((locs[c].tier, locs[c].chunk))
            if users is None or not any(u in queue for u in users):      # a shared chunk is queued once
                queue[(seq_id, layer, c)] = None
        self._marked[(seq_id, layer)] = max(done, ready)

    def drop_from(self, seq_id: int, layer: int, n: int) -> None:
        """Keep blocks ``0 .. n-1`` of (seq, layer) (a truncated sequence): chunks past them are
        released; the chunk cut in two keeps its slots (its later blocks will be rewritten)."""
        locs = self.tables[seq_id][layer]
        keep = -(-n // self.cb)
        while len(locs) > keep:
            c = len(locs) - 1
            self._release((seq_id, layer, c), locs.pop())
        self.blocks[seq_id][layer] = n
        sink, ready = self._pins(layer, n)
        for c in range(ready, len(locs)):                   # back in the recent window
            self._queue(locs[c].tier, layer).pop((seq_id, layer, c), None)
        self._marked[(seq_id, layer)] = max(sink, ready)
        self._touch(seq_id, layer)

    def _touch(self, seq_id: int, layer: int) -> None:
        self.stamp[(seq_id, layer)] = self.stamp.get((seq_id, layer), 0) + 1

    def _room(self, level: int, moves: list[Move]) -> Loc:
        """A free chunk at tier ``level`` or below, demoting (appending moves) where needed."""
        for t in range(level, len(self.tiers)):
            tier = self.tiers[t]
            if tier.has_room():
                return Loc(t, tier.alloc())
            queue = self.evictable[t] or self.evictable_hot[t]      # cold chunks go first
            if queue and t + 1 < len(self.tiers):
                vkey, _ = queue.popitem(last=False)
                vsid, vlayer, vc = vkey
                src = self.tables[vsid][vlayer][vc]
                dst = self._room(t + 1, moves)               # deeper moves are listed first
                placed = min(self.cb, self.blocks[vsid][vlayer] - vc * self.cb)   # a cached layer's may be partial
                moves.append(Move(vkey, src, dst, placed))
                users = self.users.pop((src.tier, src.chunk), None)
                for usid, ulayer, uc in users or (vkey,):    # every sharer's table follows the move
                    self.tables[usid][ulayer][uc] = dst
                    self._touch(usid, ulayer)
                if users is not None:
                    self.users[(dst.tier, dst.chunk)] = users
                tier.release(src.chunk)
                self._queue(dst.tier, vlayer)[vkey] = None
                return Loc(t, tier.alloc())
        raise KVBudgetExceeded(self._full_message())

    def _full_message(self) -> str:
        parts = [f"{t.name} {t.used} chunks" for t in self.tiers]
        return "KV cache does not fit in the tier budgets (full: " + ", ".join(parts) + ")"
