"""ctypes binding of ``paged_attn.c`` on raw addresses and numpy arrays (no torch import:
disk workers are separate processes that load only numpy and this module)."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from kvoffload.kernels.build import load

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_ARGTYPES = [_I, _I, _I, _I, _I, _P, _L, _P, _P, _P, _P, _L, _P, _L, _P, _P, ctypes.c_float, _P, _P, _I, _P]
KERNEL_DTYPES = ("float32", "bfloat16", "float16")
_SUFFIX = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
G_MAX, D_MAX, BS_MAX = 32, 256, 256
MASK_BS_MAX = 64           # token masks are one uint64 per (block, head)
# The kernel computes one query row at a time (no reuse of a block across rows): right for
# decode and for a verify pass's few rows; a prefill chunk's many rows go to flash attention.
MAX_QUERY_ROWS = 32


@dataclass(frozen=True)
class BlockLists:
    """Which blocks each sequence attends: ``ptrs[first[b]:first[b+1]]`` are slot addresses,
    all full except the last, which holds ``last_len[b]`` tokens (int64 arrays). ``masks``
    (sparse attention): ``[total blocks, H_kv]`` uint64, bit t = token t of that block is
    attended by that KV head (0: the head's rows of the block are not read); ``None`` = all."""

    first: np.ndarray      # [B + 1]
    ptrs: np.ndarray       # [total blocks]
    last_len: np.ndarray   # [B]
    masks: np.ndarray | None = None

    @classmethod
    def build(cls, per_seq: list[np.ndarray], last_len: list[int],
              masks: list[np.ndarray] | None = None) -> BlockLists:
        first = np.zeros(len(per_seq) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in per_seq], out=first[1:])
        ptrs = np.concatenate(per_seq).astype(np.int64, copy=False) if per_seq else np.zeros(0, np.int64)
        m = None
        if masks is not None:
            m = np.ascontiguousarray(np.concatenate(masks), dtype=np.uint64) if masks else np.zeros((0, 1), np.uint64)
        return cls(first, ptrs, np.asarray(last_len, dtype=np.int64), m)


def full_mask_row(bs: int, H_kv: int) -> np.ndarray:
    """``[1, H_kv]`` uint64: every token of a block, for every head."""
    return np.full((1, H_kv), (1 << bs) - 1, np.uint64)


def masks_to_valid(masks: np.ndarray, bs: int) -> np.ndarray:
    """``[n, H_kv]`` uint64 token masks -> ``[H_kv, n*bs]`` bool (token t of block i at i*bs+t)."""
    bits = (masks[:, :, None] >> np.arange(bs, dtype=np.uint64)) & np.uint64(1)     # [n, H_kv, bs]
    return bits.astype(bool).transpose(1, 0, 2).reshape(masks.shape[1], -1)


class PagedAttention:
    """``__call__`` -> fills ``out`` ``[B, H, D]`` and ``lse`` ``[B, H]`` (fp32)."""

    def __init__(self, dtype: str, H_kv: int, G: int, D: int, block_size: int) -> None:
        self.H_kv, self.G, self.D, self.bs = H_kv, G, D, block_size
        self.scale = 1.0 / math.sqrt(D)
        lib = load("paged_attn")
        if lib is None or dtype not in _SUFFIX or G > G_MAX or D > D_MAX or block_size > BS_MAX:
            raise RuntimeError("native paged attention unavailable for this geometry")
        self.fn = getattr(lib, f"kvo_paged_attn_{_SUFFIX[dtype]}")
        self.fn.argtypes, self.fn.restype = _ARGTYPES, ctypes.c_int

    @staticmethod
    def available(dtype: str, G: int, D: int, block_size: int) -> bool:
        return (dtype in _SUFFIX and G <= G_MAX and D <= D_MAX and block_size <= BS_MAX
                and load("paged_attn") is not None)

    def __call__(self, B: int, q_ptr: int, q_bstride: int, lists: BlockLists, out_ptr: int, lse_ptr: int,
                 threads: int, append: tuple[int, int, int, int, np.ndarray, np.ndarray] | None = None) -> None:
        """``q_ptr``: ``[B, H, D]`` fp32 queries, batch stride ``q_bstride`` elements (bf16 KV:
        scored by VDPBF16PS, in one pass when q is bf16-exact, else with its bf16 remainder too).
        ``append``: (k_ptr, k_bstride, v_ptr, v_bstride, slot_addrs [B], columns [B]) writes the
        new token's k/v (``[B, H_kv, D]``) into its tail slot before attending."""
        if append is None:
            k = kb = v = vb = 0
            app_ptr = app_pos = None
        else:
            k, kb, v, vb, app_ptr, app_pos = append
        rc = self.fn(B, self.H_kv, self.G, self.D, self.bs, q_ptr, q_bstride, lists.first.ctypes.data,
                     lists.ptrs.ctypes.data, lists.last_len.ctypes.data, k, kb, v, vb,
                     None if app_ptr is None else app_ptr.ctypes.data,
                     None if app_pos is None else app_pos.ctypes.data,
                     self.scale, out_ptr, lse_ptr, threads,
                     None if lists.masks is None else lists.masks.ctypes.data)
        if rc != 0:
            raise RuntimeError("native paged attention rejected its arguments")


def read_bandwidth_probe():
    """The ``kvo_read_sum(ptr, n_floats, threads)`` function (for peak-bandwidth measurement)."""
    lib = load("paged_attn")
    if lib is None:
        return None
    fn = lib.kvo_read_sum
    fn.argtypes, fn.restype = [_P, _L, _I], ctypes.c_double
    return fn
