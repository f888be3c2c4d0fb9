"""Prompt prefixes in a persistent block store (:class:`~kvoffload.kv.persist.store.BlockDir`):
the engine's side. A prompt's full blocks are keyed by chain (kv/persist/store.py's
``chain_keys`` in this store's namespace ``ns``, computed by the engine); the leading
blocks found in the store are handed to the KV manager as slots (its own format, byte for byte)
and the prompt's prefill starts after them; the blocks a prefill computed are stored.
"""

from __future__ import annotations

from collections.abc import Callable
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
        directory.note_namespace(self.ns, {"model": fingerprint, "source": source, "layers": num_layers, "block_size": layout.block_size,
                                           "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                                           "kv_dtype": layout.dtype})

    def _expect(self, h: BlockHeader) -> bool:
        lay = self.layout
        return (h.namespace == self.ns and h.layers == self.num_layers and h.slot_bytes == lay.slot_bytes
                and h.stride == lay.disk_stride and h.block_size == lay.block_size)

    # ---- reading ----
    def find(self, keys: list[bytes], into: torch.Tensor | None = None) -> Found | None:
        """The longest run of leading blocks in the store (a damaged one ends it: it is dropped
        and recomputed); None when the first is missing. The blocks found are touched (LRU).
        ``into``: where the slots go (``[layers, >= len(keys), slot_elems]``, KV dtype, CPU: the
        KV manager's own memory, :meth:`KVManager.slot_buffer`); else a new array."""
        L, sb = self.num_layers, self.layout.slot_bytes
        if into is None:
            out = np.empty((L, len(keys), sb), np.uint8)                   # [layers, n, slot_bytes]
        else:
            out = into.view(torch.uint8).numpy()
            if out.shape[0] != L or out.shape[1] < len(keys) or out.shape[2] != sb:
                raise ValueError(f"into: [{L}, >= {len(keys)}, {sb} bytes], got {tuple(out.shape)}")
        n = self._scan(keys, out, None)
        if not n:
            return None
        return Found(into[:, :n] if into is not None else torch.from_numpy(out[:, :n]).view(self.dtype))

    def load(self, keys: list[bytes], place: Callable[[int, torch.Tensor], None], batch: int = 64) -> int:
        """:meth:`find` for a KV manager that copies blocks to their place anyway (the tiered
        store): the blocks found, ``batch`` at a time, go to ``place(i, slots)`` (blocks ``i ..``,
        ``[layers, k, slot_elems]``, a view of one reused buffer valid during the call); returns
        how many. (One buffer of ``batch`` blocks, not a fresh array of the whole prefix.)"""
        out = np.empty((self.num_layers, min(batch, len(keys)), self.layout.slot_bytes), np.uint8)
        return self._scan(keys, out, lambda i, k: place(i, torch.from_numpy(out[:, :k]).view(self.dtype)))

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
            payload = np.frombuffer(r[1], np.uint8, count=L * lay.disk_stride, offset=HEADER)
            out[:, n % cap] = payload.reshape(L, lay.disk_stride)[:, :lay.slot_bytes]
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
        """Index of the first of ``keys`` without a block file (len(keys): all there)."""
        import os

        for i, k in enumerate(keys):
            if not os.path.exists(self.dir.file_of(k.hex())):
                return i
        return len(keys)

    # ---- writing ----
    def save(self, token_ids: list[int], keys: list[bytes], first: int, slots: torch.Tensor) -> int:
        """Store blocks ``first ..`` of a prompt (``keys`` its chain keys from block 0, ``slots``
        ``[layers, n, slot_elems]`` those blocks' KV). Returns the blocks written; stops at the
        first failed write (a later block without its parent is never found)."""
        lay, bs = self.layout, self.layout.block_size
        n = slots.shape[1]
        raw = slots.detach().cpu().contiguous().view(torch.uint8).numpy()   # [layers, n, slot_bytes]
        written = []
        # one file image reused for every block (header, then each layer's slot at its page-aligned
        # stride; the padding stays zero): no fresh memory a block
        image = bytearray(HEADER + self.num_layers * lay.disk_stride)
        payload = np.frombuffer(image, np.uint8, offset=HEADER).reshape(self.num_layers, lay.disk_stride)
        for i in range(n):
            b = first + i
            payload[:, :lay.slot_bytes] = raw[:, i]
            parent = keys[b - 1] if b else ROOT
            tokens = np.asarray(token_ids[b * bs:(b + 1) * bs], np.int64)
            h = BlockHeader(self.num_layers, lay.slot_bytes, lay.disk_stride, bs, _checksum(payload), keys[b],
                            parent, self.ns, tokens)
            image[:HEADER] = h.pack()
            if not self.dir.write(keys[b].hex(), image):
                break
            written.append(keys[b].hex())
        self.dir.sync_dirs(written)
        return len(written)

    def pin(self, keys: list[bytes]) -> None:
        self.dir.pin([k.hex() for k in keys])

    def unpin(self, keys: list[bytes]) -> None:
        self.dir.unpin([k.hex() for k in keys])

    def report(self) -> str:
        c = self.dir.counters
        return (f"KV store {self.dir.path}: {c.hits} blocks reused ({c.hit_tokens} prompt tokens not prefilled), "
                f"{c.written} written, {c.damaged} dropped as damaged, {c.evicted} evicted; "
                f"holds {self.dir.bytes_held / 2**20:.1f} MiB")
