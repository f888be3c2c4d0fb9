"""The worker protocol: a request names the layer, the sequences, their blocks and the queries
(plus, for the worker that holds the tails, the new token's k/v); a reply carries the partial
output, its log-sum-exp and the bytes the worker read. Torch-free; arrays are numpy in the
process transport and may be torch tensors in-process (same shapes).

Two phases, as every transfer here: ``submit(request)`` starts the work and returns at once;
``collect()`` waits for the reply. A backend submits to every worker before collecting any, so
the tiers compute at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class AttendRequest:
    """layer: model layer. seq_ids: the sequences (B). blocks: per sequence, the worker's slot
    numbers to attend (full blocks, any order). q: ``[B, L, H, D]`` queries (fp32), L = 1 in
    decode, more for a prefill chunk or a block of draft tokens (keys here all precede them).
    tail_slots / tail_lens: per sequence, the write-combining tail block and its tokens (only
    for the worker that holds the tails); k_new / v_new ``[B, H_kv, D]``: decode's new token,
    appended to the tail before attending. masks: sparse decode only, per sequence a
    ``[len(blocks[b]), H_kv]`` uint64 array: bit t = token t of that block is attended by that KV
    head (0: the head skips the block); ``None`` = every token of every listed block."""

    layer: int
    seq_ids: tuple[int, ...]
    blocks: list[Any]
    q: Any
    tail_slots: Any = None
    tail_lens: Any = None
    k_new: Any = None
    v_new: Any = None
    masks: Any = None


@dataclass
class AttendResult:
    """o: ``[B, L, H, D]`` fp32, normalised over this worker's keys; lse: ``[B, L, H]`` fp32
    (``-inf`` where it had no keys); bytes_read: KV bytes read to compute it; bytes_in /
    bytes_out: request and reply payload (what crossed the boundary to the worker)."""

    o: Any
    lse: Any
    bytes_read: int
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class WriteBlocks:
    """Whole blocks for a worker's shard: ``data`` holds ``len(slots)`` slots back to back."""

    slots: Any
    data: Any


class Worker(Protocol):
    def submit(self, req: AttendRequest) -> None: ...
    def collect(self) -> AttendResult: ...
    def write(self, w: WriteBlocks) -> None: ...
    def close(self) -> None: ...
