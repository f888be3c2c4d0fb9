"""A memory tier (the compute device's memory, or host RAM): an arena of slots.

The arena grows in fixed segments as slots are taken, up to the tier's byte budget, so an
unused budget costs no memory. Host segments are pinned when the compute device is CUDA, so
copies to and from the device can be asynchronous.
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload.kv.layout import BlockLayout


class TierFull(Exception):
    """No free slot within the tier's budget (placement then spills to the next tier)."""


class MemoryTier:
    def __init__(self, name: str, layout: BlockLayout, dtype: torch.dtype, device: torch.device,
                 capacity: int | None, segment_slots: int, pin: bool = False) -> None:
        """capacity: slots allowed by the budget (``None`` = unlimited)."""
        self.name, self.layout, self.dtype, self.device = name, layout, dtype, device
        self.capacity, self.segment_slots, self.pin = capacity, segment_slots, pin
        self.segments: list[torch.Tensor] = []                 # each [segment_slots, slot_elems]
        self.addrs = np.zeros(0, dtype=np.int64)               # slot -> address
        self._free: list[int] = []
        self.used = 0

    # ---- allocation ----
    def has_room(self) -> bool:
        return self.capacity is None or self.used < self.capacity

    def alloc(self) -> int:
        if not self.has_room():
            raise TierFull(self.name)
        if not self._free:
            self._grow()
        self.used += 1
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)
        self.used -= 1

    def _grow(self) -> None:
        n = self.segment_slots
        if self.capacity is not None:
            n = max(1, min(n, self.capacity - len(self.addrs)))
        seg = torch.empty(n, self.layout.slot_elems, dtype=self.dtype, device=self.device,
                          pin_memory=self.pin and self.device.type == "cpu")
        base = len(self.addrs)
        self.segments.append(seg)
        stride = self.layout.slot_bytes
        self.addrs = np.concatenate([self.addrs, seg.data_ptr() + stride * np.arange(n, dtype=np.int64)])
        self._free.extend(range(base + n - 1, base - 1, -1))     # pop() hands out low slots first
        self._seg_of = np.repeat(np.arange(len(self.segments)), [len(s) for s in self.segments])
        self._row_of = np.concatenate([np.arange(len(s)) for s in self.segments])

    @property
    def bytes_held(self) -> int:
        """Memory actually allocated (never more than the budget)."""
        return len(self.addrs) * self.layout.slot_bytes

    # ---- data ----
    def view(self, slot: int) -> torch.Tensor:
        """``[slot_elems]`` view of one slot."""
        return self.segments[self._seg_of[slot]][self._row_of[slot]]

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        """``[n, slot_elems]`` copy of the slots, in the given order."""
        if len(self.segments) == 1:
            return self.segments[0][torch.from_numpy(slots)]
        segs, rows = self._seg_of[slots], self._row_of[slots]
        out = torch.empty(len(slots), self.layout.slot_elems, dtype=self.dtype, device=self.device)
        for s in np.unique(segs):
            at = np.nonzero(segs == s)[0]
            out[torch.from_numpy(at)] = self.segments[s][torch.from_numpy(rows[at])]
        return out
