"""Prefix sharing within a process: which live sequences hold which full prompt blocks, by
chain key (kv/persist/store.py: a block's key covers its tokens and every token before it, so a
sequence that holds a block holds all the blocks before it too). A sequence admitted while
another holds its prompt's leading blocks takes them from it (the KV manager's
``share_prefix``) instead of prefilling them. vLLM's block-hash table, without keeping the
blocks of finished sequences (the persistent store does that, ``--kv-store``).
"""

from __future__ import annotations


class LivePrefixes:
    """Chain key -> the live sequences holding that block (in the order they came)."""

    def __init__(self) -> None:
        self.holders: dict[bytes, dict[int, None]] = {}
        self.held: dict[int, list[bytes]] = {}             # seq -> keys of its leading blocks held

    def add(self, seq_id: int, keys: list[bytes]) -> None:
        """The sequence holds the blocks keyed ``keys`` (its leading ones; a longer list as its
        prefill goes on)."""
        have = self.held.setdefault(seq_id, [])
        for k in keys[len(have):]:
            self.holders.setdefault(k, {})[seq_id] = None
            have.append(k)

    def remove(self, seq_id: int) -> None:
        """The sequence is done (finished, aborted): its blocks are no longer offered."""
        for k in self.held.pop(seq_id, []):
            h = self.holders[k]
            del h[seq_id]
            if not h:
                del self.holders[k]

    def longest(self, keys: list[bytes]) -> tuple[int | None, int]:
        """(a live sequence holding the most leading blocks of ``keys``, how many); (None, 0)
        when none holds the first."""
        source, n = None, 0
        for k in keys:
            h = self.holders.get(k)
            if not h:
                break
            source, n = next(iter(h)), n + 1
        return source, n
