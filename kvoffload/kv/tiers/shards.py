"""Chunks spread over the shards of a tier whose workers each own one shard (the disk tier's
worker processes, the ray tier's actors): where a chunk lives, and a request cut per shard.

Chunk ``c`` lives in shard ``c % W`` (round-robin), at that shard's chunk ``c // W``: a chunk's
blocks are consecutive slots of one shard, and with the lowest free chunk handed out first no
shard ever holds more than ``ceil(capacity / W)`` chunks.
"""

from __future__ import annotations

import numpy as np

from kvoffload.kv.tiers.protocol import AttendRequest


def shard_of(slots: np.ndarray, chunk_blocks: int, shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Tier slots -> (shard, the shard's slot)."""
    chunk, i = np.divmod(np.asarray(slots, np.int64), chunk_blocks)
    return chunk % shards, (chunk // shards) * chunk_blocks + i


def split_request(req: AttendRequest, chunk_blocks: int, shards: int) -> list[tuple[int, np.ndarray, AttendRequest]]:
    """The request cut by shard: (shard, the request's items it gets, its request in the shard's
    slots), items in request order. q becomes a numpy array (what crosses to a worker)."""
    if req.num_items == 0:
        return []
    shard, local = shard_of(req.slots, chunk_blocks, shards)
    q = req.q.numpy() if hasattr(req.q, "numpy") else req.q
    if shards == 1:                                      # one shard: the request as it is
        return [(0, np.arange(req.num_items), AttendRequest(req.layer, q, req.seq, req.first, local, req.masks))]
    item_shard = shard[req.first[:-1]]                   # a chunk's blocks are all in one shard
    block_shard = np.repeat(item_shard, np.diff(req.first))
    out = []
    for w in np.unique(item_shard):
        items = np.nonzero(item_shard == w)[0]
        counts = req.first[items + 1] - req.first[items]
        first = np.zeros(len(items) + 1, np.int64)
        np.cumsum(counts, out=first[1:])
        blocks = np.nonzero(block_shard == w)[0]         # its items' blocks, in order
        sub = AttendRequest(req.layer, q, req.seq[items], first, local[blocks],
                            None if req.masks is None else req.masks[blocks])
        out.append((int(w), items, sub))
    return out


def as_runs(first: np.ndarray, slots: np.ndarray) -> np.ndarray | None:
    """Each item's first slot when every item's slots are consecutive (whole chunks, as dense
    decode sends them): the block list in one number per item; else None."""
    starts = slots[first[:-1]]
    return starts if np.array_equal(from_runs(first, starts), slots) else None


def from_runs(first: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Item i's slots ``starts[i] .. starts[i] + first[i+1] - first[i] - 1``, concatenated."""
    counts = np.diff(first)
    return np.repeat(starts - first[:-1], counts) + np.arange(first[-1], dtype=np.int64)


def request_bytes(req: AttendRequest) -> int:
    """Payload bytes of a request sent to a worker: q and the item / block lists."""
    return sum(a.nbytes for a in (req.q, req.seq, req.first, req.slots) if a is not None) \
        + (0 if req.masks is None else req.masks.nbytes)
