"""Prompt prefixes in a persistent block store (:class:`~kvoffload.kv.persist.store.BlockDir`):
the engine's side. A prompt's full blocks are keyed by chain (kv/persist/store.py's
``chain_keys`` in this store's namespace ``ns``, computed by the engine); the leading
blocks found in the store are handed to the KV manager as slots (its own format, byte for byte)
and the prompt's prefill starts after them; the blocks a prefill computed are stored, by one
writer thread behind the model (:meth:`PrefixStore.save`; :meth:`PrefixStore.flush` waits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kvoffload.dtypes import storage_torch_dtype
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.persist.store import (
    HEADER,
    ROOT,
    BlockDir,
    BlockHeader,
    _checksum,
    namespace,
)

PENDING_BYTES = 512 << 20           # KV held by queued writes at most (PrefixStore.save waits past it)


@dataclass(frozen=True)
class Found:
    """The leading blocks of a prompt found in the store: their slots ``[layers, n, slot_elems]``
    (KV dtype), ``n`` blocks."""

    slots: torch.Tensor

    @property
    def blocks(self) -> int:
        return self.slots.shape[1]


class PrefixStore:
    """A store directory as one model's prefix cache."""

    def __init__(self, directory: BlockDir, fingerprint: str, layout: BlockLayout, num_layers: int,
                 source: str = "") -> None:
        self.dir, self.layout, self.num_layers = directory, layout, num_layers
        self.ns = namespace(fingerprint, layout)
        self.dtype = storage_torch_dtype(layout.dtype)          # (a compressed KV's slots: bytes)
        self._pool: ThreadPoolExecutor | None = None            # the writer thread (started by the first save)
        self._jobs: deque = deque()                             # (future, bytes, block keys) queued, in order
        self._queued: set[str] = set()                          # keys of blocks queued, not yet written
        self._pending = 0                                       # bytes of KV the queued writes hold
        self._broken: set[bytes] = set()                        # (writer) keys whose chain has a hole
        directory.note_namespace(self.ns, {"model": fingerprint, "source": source, "layers": num_layers, "block_size": layout.block_size,
                                           "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                                           "kv_dtype": layout.dtype})

    def _expect(self, h: BlockHeader) -> bool:
        lay = self.layout
        return (h.namespace == self.ns and h.layers == self.num_layers and h.slot_bytes == lay.slot_bytes
                and h.stride == lay.page_stride and h.block_size == lay.block_size)

    # ---- reading ----
    def find(self, keys: list[bytes]) -> Found | None:
        """The longest run of leading blocks in the store (a damaged one ends it: it is dropped
        and recomputed), in a new array; None when the first is missing. The blocks found are
        touched (LRU)."""
        self.flush()
        out = np.empty((self.num_layers, len(keys), self.layout.slot_bytes), np.uint8)   # [layers, n, slot_bytes]
        n = self._scan(keys, out, None)
        return Found(torch.from_numpy(out[:, :n]).view(self.dtype)) if n else None

    def load(self, keys: list[bytes], place: Callable[[int, torch.Tensor], None], batch: int = 64,
             into: torch.Tensor | None = None) -> int:
        """:meth:`find` handing the blocks to ``place(i, slots)`` (blocks ``i ..``, ``[layers, k,
        slot_elems]``); returns how many. ``into`` (``[layers, >= len(keys), slot_elems]``, KV
        dtype, CPU: the KV manager's own memory, :meth:`KVManager.slot_buffer`): the blocks are
        read straight into it and handed on once, as a view of it. Else ``batch`` at a time
        through one reused buffer (valid during each call): a KV manager that copies blocks to
        their place anyway (the tiered store) needs no fresh array of the whole prefix."""
        self.flush()
        if into is None:
            out = np.empty((self.num_layers, min(batch, len(keys)), self.layout.slot_bytes), np.uint8)
            return self._scan(keys, out, lambda i, k: place(i, torch.from_numpy(out[:, :k]).view(self.dtype)))
        out = into.view(torch.uint8).numpy()
        L, sb = self.num_layers, self.layout.slot_bytes
        if out.shape[0] != L or out.shape[1] < len(keys) or out.shape[2] != sb:
            raise ValueError(f"into: [{L}, >= {len(keys)}, {sb} bytes], got {tuple(out.shape)}")
        n = self._scan(keys, out, None)
        if n:
            place(0, into[:, :n])
        return n

    def _scan(self, keys: list[bytes], out: np.ndarray, full: Callable[[int, int], None] | None) -> int:
        """Blocks of ``keys`` read in order until one is missing or damaged, their slots copied
        into ``out`` ``[layers, cap, slot_bytes]`` (``full``: round robin, ``full(i, k)`` called
        with each ``k`` blocks ``i ..`` held there; None: ``out`` holds them all). Each file is
        read into one reused buffer and checked first: no fresh memory a block (first touches of
        fresh pages dominate this path). The blocks found are touched (LRU) and counted."""
        lay, L = self.layout, self.num_layers
        hexes = [k.hex() for k in keys]
        buf, n, cap = bytearray(), 0, out.shape[1]
        for key in hexes:
            r = self.dir.read(key, self._expect, buf=buf)
            if r is None:
                break
            payload = np.frombuffer(r[1], np.uint8, count=L * lay.page_stride, offset=HEADER)
            out[:, n % cap] = payload.reshape(L, lay.page_stride)[:, :lay.slot_bytes]
            n += 1
            if full is not None and n % cap == 0:
                full(n - cap, cap)
        if full is not None and n % cap:
            full(n - n % cap, n % cap)
        if n:
            self.dir.touch(hexes[:n])
            self.dir.counters.hits += n
            self.dir.counters.hit_tokens += n * lay.block_size
        return n

    def missing(self, keys: list[bytes]) -> int:
        """Index of the first of ``keys`` without a block file or a queued write (len(keys): all
        there)."""
        import os

        for i, k in enumerate(keys):
            h = k.hex()
            if h not in self._queued and not os.path.exists(self.dir.file_of(h)):
                return i
        return len(keys)

    # ---- writing (behind the model: one writer thread) ----
    def save(self, token_ids: list[int], keys: list[bytes], first: int, slots: torch.Tensor) -> int:
        """Store blocks ``first ..`` of a prompt (``keys`` its chain keys from block 0, ``slots``
        ``[layers, n, slot_elems]`` those blocks' KV, which this store may keep until written).
        The writes are queued for a writer thread, in order, while the model goes on (their
        file writes and fsyncs overlap the next prefill chunk); :meth:`flush` waits for them,
        and the lookups, the report and eviction flush first. At most ``PENDING_BYTES`` wait:
        past that, this waits for the oldest. A block that fails to be written (a full disk:
        one warning) ends its prompt's chain: the later blocks are not written (they could
        never be found past the hole). Returns the blocks queued."""
        n = slots.shape[1]
        if not n:
            return 0
        raw = slots.detach().cpu().contiguous().view(torch.uint8).numpy()   # [layers, n, slot_bytes]
        while self._jobs and self._pending + raw.nbytes > PENDING_BYTES:
            self._retire(self._jobs.popleft())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvoffload-store-writer")
        hexes = [keys[first + i].hex() for i in range(n)]
        bs = self.layout.block_size
        job = self._pool.submit(self._write, list(token_ids[first * bs:(first + n) * bs]), keys[max(first - 1, 0):first + n],
                                first, raw)
        self._jobs.append((job, raw.nbytes, hexes))
        self._queued.update(hexes)
        self._pending += raw.nbytes
        return n

    def flush(self) -> None:
        """Wait for every queued write (a writer's unexpected error is raised here)."""
        while self._jobs:
            self._retire(self._jobs.popleft())

    def _retire(self, job) -> None:
        fut, nbytes, hexes = job
        try:
            fut.result()
        finally:
            self._pending -= nbytes
            self._queued.difference_update(hexes)

    def _write(self, tokens: list[int], keys: list[bytes], first: int, raw: np.ndarray) -> int:
        """(The writer thread.) Blocks ``first ..`` (``tokens`` theirs; ``keys`` from the parent
        of the first, if any) as files; returns how many were written."""
        lay, bs, L = self.layout, self.layout.block_size, self.num_layers
        chain = keys[1:] if first else keys
        if first and keys[0] in self._broken:                  # its parent was never written
            self._broken.update(chain)
            return 0
        written = []
        # one file image reused for every block (header, then each layer's slot at its page-aligned
        # stride; the padding stays zero): no fresh memory a block
        image = bytearray(HEADER + L * lay.page_stride)
        payload = np.frombuffer(image, np.uint8, offset=HEADER).reshape(L, lay.page_stride)
        for i, key in enumerate(chain):
            payload[:, :lay.slot_bytes] = raw[:, i]
            parent = keys[i] if first else (chain[i - 1] if i else ROOT)
            h = BlockHeader(L, lay.slot_bytes, lay.page_stride, bs, _checksum(payload), key, parent, self.ns,
                            np.asarray(tokens[i * bs:(i + 1) * bs], np.int64))
            image[:HEADER] = h.pack()
            if not self.dir.write(key.hex(), image):
                self._broken.update(chain[i:])
                break
            written.append(key.hex())
        self.dir.sync_dirs(written)
        return len(written)

    def enforce_budget(self) -> None:
        """The store's byte budget, once the queued writes are in."""
        self.flush()
        self.dir.enforce_budget()

    def pin(self, keys: list[bytes]) -> None:
        self.dir.pin([k.hex() for k in keys])

    def unpin(self, keys: list[bytes]) -> None:
        self.dir.unpin([k.hex() for k in keys])

    def report(self) -> str:
        self.flush()
        c = self.dir.counters
        return (f"KV store {self.dir.path}: {c.hits} blocks reused ({c.hit_tokens} prompt tokens not prefilled), "
                f"{c.written} written, {c.damaged} dropped as damaged, {c.evicted} evicted; "
                f"holds {self.dir.bytes_held / 2**20:.1f} MiB")
