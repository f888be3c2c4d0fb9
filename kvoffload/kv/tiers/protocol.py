"""What a KV tier is: the one interface every tier implements once (memory, disk, and the tiers
to come), and the messages its attention worker takes and gives.

A tier holds whole *chunks* (``layout.chunk_blocks`` consecutive blocks of one (sequence,
layer)) within a byte budget. Its slots are numbered ``chunk * chunk_blocks + i``; what a slot
number means (an address in an arena, an offset in a shard file of some worker process) is the
tier's business. Above it, the block store decides where chunks go (kv/placement.py: the
*prepare* half of every move) and calls :meth:`Tier.write` / :meth:`Tier.read` to *complete*
them; the tiered attention backend sends each tier's worker the queries and the items to attend
(:class:`AttendRequest`) and merges the partial outputs that come back.

Attention is two-phase: ``submit(request)`` starts the work and returns at once; ``collect()``
returns its result. The backend submits to every tier before collecting any (collecting
fastest-first), so tiers compute at the same time; an in-process tier computes at ``collect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from kvoffload.config import KVConfig
    from kvoffload.kv.layout import BlockLayout


@dataclass
class TierCounters:
    """Cumulative. read: KV bytes read by the tier's worker(s) to attend or to hand back
    (gather, moves). written: bytes of blocks stored into the tier. to_worker / from_worker:
    request and reply payload bytes that crossed into / out of the tier's worker(s) (0
    in-process). blocks / ahead / cached: blocks attended, of them those already read ahead,
    and those found in the tier's block cache (read on an earlier step)."""

    read: int = 0
    written: int = 0
    to_worker: int = 0
    from_worker: int = 0
    blocks: int = 0
    ahead: int = 0
    cached: int = 0

    def attended(self, read: int, blocks: int) -> None:
        """An attend read ``read`` KV bytes of ``blocks`` blocks (however it ran: a tier's call,
        a prepared call, the backend's native hook)."""
        self.read += read
        self.blocks += blocks


@dataclass(frozen=True)
class TierSpec:
    """One entry of the ordered tier list: a registered tier ``name`` and its ``budget`` in
    bytes (``None`` = unlimited; for disk, the free space)."""

    name: str
    budget: int | None


@dataclass(frozen=True)
class TierContext:
    """What every tier is built with. layout: block geometry; group: query heads per KV head;
    device: the compute device; threads: CPU threads for attention; kv: the KV options
    (tier-specific ones such as the disk's ``offload_dir`` are read by the tier that uses them);
    native: use the native kernels where they apply (``False``: the PyTorch / numpy references,
    for tests)."""

    layout: BlockLayout
    group: int
    device: torch.device
    threads: int
    kv: KVConfig
    native: bool = True


@dataclass
class AttendRequest:
    """Attend some of a tier's chunks, for the queries of a batch.

    layer: model layer. q: ``[B, L, H, D]`` fp32 queries (L = 1 in decode, gamma+1 in a verify
    pass; every key here precedes them). Items: item i attends, for every query row of batch
    row ``seq[i]``, the tier's slots ``slots[first[i]:first[i+1]]`` (full blocks of one chunk,
    in sequence order). masks: ``None`` (every token), or ``[len(slots), H_kv]`` uint64: bit t
    = token t of that block is attended by that KV head (0: the head skips the block). Arrays
    are numpy int64 / uint64; q a CPU torch tensor or numpy array (``None`` in a prefetch hint).
    key: when not ``None``, requests with the same key carry the same items (only q differs): a
    tier may keep what it prepared for them (an in-process tier keeps its prepared kernel call).
    """

    layer: int
    q: Any
    seq: np.ndarray
    first: np.ndarray
    slots: np.ndarray
    masks: np.ndarray | None = None
    key: Any = None

    @property
    def num_items(self) -> int:
        return len(self.seq)


@dataclass
class AttendResult:
    """o: ``[N, L, H, D]`` fp32, item i's output normalised over its keys; lse: ``[N, L, H]``
    fp32 (``-inf`` where a head attended nothing); bytes_read: KV bytes read to compute them;
    bytes_in / bytes_out: request and reply payload that crossed to the worker; ahead: blocks
    attended that a prefetch had read already; cached: blocks attended from the block cache."""

    o: Any
    lse: Any
    bytes_read: int
    bytes_in: int = 0
    bytes_out: int = 0
    ahead: int = 0
    cached: int = 0


class Tier(Protocol):
    """One storage tier and its attention worker. Constructed as ``cls(spec, ctx)``."""

    name: str
    medium: str                     # what its bytes live on: "memory", "disk" (a bench's bandwidth bound)
    prefetches: bool                # whether prefetch hints are used (the backend skips building them otherwise)
    # this process attends the tier's blocks by address (memory; a disk shard it reads itself):
    # a sparse decode layer then resolves them in native code instead of sending a request
    # (:meth:`locs`; a *read tier* -- one whose blocks must be read first -- also has
    # :attr:`resident` and :meth:`fetch`)
    direct: bool
    budget: int | None              # bytes
    capacity: int | None            # chunks the budget holds (None = unlimited)
    counters: TierCounters

    @staticmethod
    def chunk_bytes(layout: BlockLayout) -> int:
        """Bytes one chunk of this layout takes of the tier's budget (before it is built: the
        CLI checks budgets before the model loads)."""
        ...

    # ---- chunk allocation (decided by placement) ----
    def has_room(self) -> bool: ...
    def alloc(self) -> int:
        """A free chunk; its slots are ``chunk * chunk_blocks + i``."""
        ...
    def release(self, chunk: int) -> None: ...
    @property
    def used(self) -> int:
        """Chunks allocated now."""
        ...

    # ---- whole blocks in and out ----
    def write(self, slots: np.ndarray, data: torch.Tensor) -> None:
        """Store ``data`` ``[n, slot_elems]`` (KV dtype) into ``slots`` (may be queued until
        :meth:`flush`)."""
        ...
    def flush(self) -> None:
        """Hand queued writes on (a disk tier writes while the model computes)."""
        ...
    def read(self, slots: np.ndarray) -> torch.Tensor:
        """``[n, slot_elems]`` on the compute device: the slots' bytes, after every write."""
        ...

    # ---- the attention worker ----
    def submit(self, req: AttendRequest) -> None: ...
    def collect(self) -> AttendResult: ...
    def prefetch(self, req: AttendRequest) -> None:
        """Hint: the next request will attend these items (a tier may read them ahead)."""
        ...

    # ---- direct access (tiers with ``direct``) ----
    def locs(self, slots: np.ndarray) -> np.ndarray:
        """int64 per slot: its address (held in this process's memory), or ``-(slot + 1)`` (a read
        tier's slot: its address is ``resident[slot]`` when held, else :meth:`fetch` reads it)."""
        ...

    resident: np.ndarray | None     # a read tier's slot -> address of a copy in RAM (0: none); else None

    def fetch(self, layer: int, slots: np.ndarray, ptrs: np.ndarray, refs: np.ndarray) -> None:
        """A read tier: ``slots`` of a sparse step's blocks, their addresses ``ptrs[refs]`` (0:
        not held); read those and fill their addresses in (valid until the next call); counted."""
        ...

    def bytes_held(self) -> int:
        """Memory (or disk) the tier holds now; never more than its budget."""
        ...
    def pids(self) -> list[int]:
        """Processes the tier runs (for accounting their memory); [] when in-process."""
        ...
    def close(self) -> None: ...


class ChunkPool:
    """Chunk numbers of a tier within a capacity (``None`` = unlimited); the lowest free number
    is handed out first (a disk tier's file stays as short as it can)."""

    def __init__(self, capacity: int | None) -> None:
        import heapq

        self._heap: list[int] = []
        self._push, self._pop = heapq.heappush, heapq.heappop
        self.capacity, self.used, self._next = capacity, 0, 0

    def has_room(self) -> bool:
        return self.capacity is None or self.used < self.capacity

    def alloc(self) -> int:
        self.used += 1
        if self._heap:
            return self._pop(self._heap)
        self._next += 1
        return self._next - 1

    def release(self, chunk: int) -> None:
        self.used -= 1
        self._push(self._heap, chunk)

    @property
    def high_water(self) -> int:
        """Chunk numbers ever handed out (the extent of the tier's storage)."""
        return self._next


class PooledChunks:
    """The chunk-allocation half of :class:`Tier` for a tier whose chunks are numbers in
    ``self.pool`` (a :class:`ChunkPool` of the budget's capacity) and nothing more (the disk and
    ray tiers); also sets the tier's name, budget, context and counters."""

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        self.name, self.budget, self.ctx = spec.name, spec.budget, ctx
        self.capacity = chunk_capacity(spec, self.chunk_bytes(ctx.layout))
        self.pool = ChunkPool(self.capacity)
        self.counters = TierCounters()

    def has_room(self) -> bool:
        return self.pool.has_room()

    def alloc(self) -> int:
        return self.pool.alloc()

    def release(self, chunk: int) -> None:
        self.pool.release(chunk)

    @property
    def used(self) -> int:
        return self.pool.used


def chunk_capacity(spec: TierSpec, chunk_bytes: int) -> int | None:
    """Chunks a tier's budget holds (a one-line error for a budget between 0 and one chunk)."""
    from kvoffload.errors import ConfigError

    if spec.budget is None:
        return None
    if 0 < spec.budget < chunk_bytes:
        raise ConfigError(f"the {spec.name} tier's budget of {spec.budget} bytes is smaller than one KV chunk "
                          f"({chunk_bytes} bytes; --kv-chunk-blocks sets the blocks per chunk)")
    return spec.budget // chunk_bytes


def read_bytes(layout: BlockLayout, n_blocks: int, masks: np.ndarray | None) -> int:
    """KV bytes an attention over ``n_blocks`` blocks reads: whole slots, or with token masks
    only the (block, head) runs some token of which is attended."""
    import numpy as np

    if masks is None:
        return n_blocks * layout.slot_bytes
    return int(np.count_nonzero(masks)) * layout.slot_bytes // layout.num_kv_heads


def expand_rows(seq, first, L: int):
    """A request's items, one per (item, query row): item i of batch row ``seq[i]`` becomes L
    items for rows ``seq[i]*L + l``, item-major. Returns (row ``[N*L]``, first ``[N*L+1]``,
    idx): expanded item j attends ``slots[idx[first[j]:first[j+1]]]`` (blocks repeat per row)."""
    import numpy as np

    seq = np.asarray(seq, np.int64)
    first = np.asarray(first, np.int64)
    if L == 1:
        return seq, first, np.arange(first[-1], dtype=np.int64)
    counts = np.repeat(np.diff(first), L)                                        # [N*L]
    new_first = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=new_first[1:])
    starts = np.repeat(first[:-1], L)                                             # each item's first block
    idx = np.repeat(starts - new_first[:-1], counts) + np.arange(new_first[-1], dtype=np.int64)
    row = (np.repeat(seq * L, L) + np.tile(np.arange(L, dtype=np.int64), len(seq)))
    return row, new_first, idx
