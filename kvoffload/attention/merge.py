"""Exact merge of partial attention results computed over disjoint sets of keys, in a fixed order.

Each part is normalised within its own keys and carries its log-sum-exp; then
``lse = log sum_i exp(lse_i)`` and ``o = sum_i exp(lse_i - lse) * o_i``. A part with no keys
has ``lse = -inf`` and weight 0.

Floating-point sums depend on their order, so the order is fixed by the *sequence*, not by
who computed what: every part carries a key (its chunk index; then the tail block; then a
pass's own tokens) and a row's parts are merged sorted by key, by one function (the native
``kvo_merge_parts``, also used inside the paged kernel's single-call path). With chunks of
fixed boundaries computed by the same kernel code wherever they live, every placement of the
KV gives bit-identical outputs.
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload.kernels import reference
from kvoffload.kernels.paged import merge_parts

TAIL_KEY = 1 << 40          # the tail block comes after every chunk
OWN_KEY = 1 << 41           # a prefill / verify pass's own tokens come last


class Parts:
    """Partial results for ``R`` query rows, collected from wherever they were computed."""

    def __init__(self, R: int, H: int, D: int, device: torch.device, native: bool, threads: int) -> None:
        self.R, self.H, self.D, self.device, self.threads = R, H, D, device, threads
        self.native = native and device.type == "cpu"
        self.rows: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.o: list = []
        self.lse: list = []

    def add(self, rows: np.ndarray, keys: np.ndarray, o, lse) -> None:
        """Parts for rows ``rows`` ``[P]`` with merge keys ``keys`` ``[P]``: o ``[P, H, D]``, lse
        ``[P, H]`` fp32 (numpy arrays or tensors)."""
        if len(rows):
            self.rows.append(np.asarray(rows, np.int64))
            self.keys.append(np.asarray(keys, np.int64))
            self.o.append(o)
            self.lse.append(lse)

    def merge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> o ``[R, H, D]``, lse ``[R, H]`` fp32 on the device (rows without parts: 0, -inf)."""
        rows, keys = _cat_np(self.rows, np.int64), _cat_np(self.keys, np.int64)
        order = np.lexsort((keys, rows))
        row_first = np.searchsorted(rows[order], np.arange(self.R + 1))
        if self.native:
            part_o = _cat_np([_np(t).reshape(-1, self.H, self.D) for t in self.o], np.float32)
            part_lse = _cat_np([_np(t).reshape(-1, self.H) for t in self.lse], np.float32)
            out = torch.empty(self.R, self.H, self.D)
            lse = torch.empty(self.R, self.H)
            threads = 1 if self.R * len(order) < 4096 else self.threads     # small merges: no parallel region
            merge_parts(row_first, order, part_o, part_lse, out.numpy(), lse.numpy(), threads)
            return out, lse
        part_o = torch.cat([torch.as_tensor(t).float().to(self.device).reshape(-1, self.H, self.D) for t in self.o]) \
            if self.o else torch.zeros(0, self.H, self.D, device=self.device)
        part_lse = torch.cat([torch.as_tensor(t).float().to(self.device).reshape(-1, self.H) for t in self.lse]) \
            if self.lse else torch.zeros(0, self.H, device=self.device)
        return reference.merge_parts_torch(row_first, order, part_o, part_lse)


def _np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else t


def _cat_np(parts: list[np.ndarray], dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    return np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)
