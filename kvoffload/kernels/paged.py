"""ctypes binding of ``paged_attn.c`` (numpy + ctypes only: disk workers are separate processes
that import this module and must never import torch).

Work is given as *items*: item i attends the blocks ``items.ptrs[items.first[i]:items.first[i+1]]``
(slot addresses, in that order; all full except the last, which holds ``items.last[i]``
tokens) with query row ``items.row[i]``, and yields a *partial*: ``part_o[i]`` ``[H, D]``
normalised over the item's keys and ``part_lse[i]`` ``[H]``. A partial is bit-identical wherever
and however it is computed (alone or among other items, any position, any thread count, any
process), and every merge of partials goes through one native function, in the order given.
So a sequence cut into fixed chunks of blocks (see :meth:`Items.chunked`) decodes to the same
bits whichever tier computes each chunk.

Arrays: numpy arrays, or torch CPU tensors passed as they are (duck-typed through
``data_ptr()`` / ``stride()``; torch is never imported here) -- bf16 tensors cannot go through
``.numpy()``, so that is how bf16 k/v reach :class:`Append`; a numpy bf16 k/v is ``uint16``.

Example (a single-call decode step of one layer: append, attend, merge)::

    kern = PagedAttention("bfloat16", H_kv, G, D, bs)
    items, row_first = Items.chunked(rows=range(B), ptrs=per_seq_slot_addrs, n_tokens=lens, block_size=bs)
    part_o, part_lse = np.empty((items.n, H, D), np.float32), np.empty((items.n, H), np.float32)
    out, lse = np.empty((B, H, D), np.float32), np.empty((B, H), np.float32)
    kern(q, items, part_o, part_lse, threads,
         append=Append(k_new, v_new, tail_slot_addrs, tail_cols),     # [B, H_kv, D] each
         merge=Merge(row_first, None, out, lse))
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvoffload.dtypes import DTYPES, QUANT
from kvoffload.kernels.build import load
from kvoffload.kernels.hook import AttnHook
from kvoffload.kernels.limits import (
    BS_MAX,
    D_MAX,
    G_MAX,
    H_MAX,
    MASK_BS_MAX,
    MAX_QUERY_ROWS,
)

__all__ = ["KERNEL_DTYPES", "MAX_QUERY_ROWS", "Append", "Items", "Merge", "PagedAttention", "full_mask_row",
           "masks_to_valid", "merge_parts", "read_bandwidth_probe"]

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_ATTN_ARGTYPES = [_I, _I, _I, _I,                       # H_kv, G, D, bs
                  _I, _P, _L, _P, _L, _P, _P,           # append
                  _I, _P, _L, _P, _P, _P, _P, _P, _F,   # items
                  _P, _P,                               # part_o, part_lse
                  _I, _P, _P, _P, _P,                   # merge
                  _I, _I]                               # threads, value group (compressed blocks)
_MERGE_ARGTYPES = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _I]
_SUFFIX = {n: d.kernel for n, d in (*DTYPES.items(), *QUANT.items())}
KERNEL_DTYPES = tuple(_SUFFIX)
# dtype names a k/v array of each KV dtype may have: its own (a torch tensor) or its numpy
# storage type (numpy has no bfloat16)
_STORAGE = {n: tuple(dict.fromkeys((n, np.dtype(d.storage).name))) for n, d in DTYPES.items()}


def _i64(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


def _ptr(x: np.ndarray) -> int:
    """The address of a numpy array's data (a quarter of ``x.ctypes.data``'s cost where the
    buffer protocol allows: writable, C-contiguous, non-empty)."""
    f = x.flags
    if f.c_contiguous and f.writeable and x.size:
        return ctypes.addressof(ctypes.c_char.from_buffer(x))
    return x.ctypes.data


_NP_NAME = {np.dtype(n): n for n in ("float32", "float16", "uint16")}
_TORCH_NAME: dict = {}          # torch dtype -> "float32", ... (filled as met; torch is never imported)


def _rows(x, dtypes: tuple[str, ...], tail: tuple[int, ...], name: str, packed: bool = False,
          ) -> tuple[int, int, int]:
    """(address, rows, row stride in elements) of ``x`` ``[rows, *tail]`` -- a numpy array or a
    torch CPU tensor -- whose trailing dimensions are contiguous (all of it when ``packed``).
    ``tail`` has one or two dimensions."""
    if type(x) is np.ndarray:
        dn, isz, ptr, shape, st = _NP_NAME.get(x.dtype) or x.dtype.name, x.itemsize, _ptr(x), x.shape, x.strides
    elif hasattr(x, "data_ptr"):                    # a torch tensor (never imported here)
        if not x.is_cpu:
            raise ValueError(f"{name}: not in CPU memory")
        dn = _TORCH_NAME.get(x.dtype) or _TORCH_NAME.setdefault(x.dtype, str(x.dtype).removeprefix("torch."))
        isz, ptr, shape, st = 1, x.data_ptr(), x.shape, x.stride()
    elif isinstance(x, np.ndarray):                 # a subclass
        return _rows(np.asarray(x), dtypes, tail, name, packed)
    else:
        raise TypeError(f"{name}: expected a numpy array or a CPU tensor, got {type(x).__name__}")
    if dn not in dtypes:
        raise TypeError(f"{name}: dtype {dn}, expected {' or '.join(dtypes)}")
    if len(shape) != 1 + len(tail) or shape[1] != tail[0] or (len(tail) == 2 and shape[2] != tail[1]):
        raise ValueError(f"{name}: shape {tuple(shape)}, expected [*, {', '.join(map(str, tail))}]")
    if shape[0] == 0:                               # nothing is read or written (numpy: zero strides)
        return ptr, 0, math.prod(tail)
    inner = isz                                     # a row's size (bytes / elements)
    if len(tail) == 2:
        if st[2] != isz and tail[1] > 1:
            raise ValueError(f"{name}: its trailing dimensions must be contiguous (strides {st})")
        inner *= tail[1]
    if st[1] != inner and tail[0] > 1:
        raise ValueError(f"{name}: its trailing dimensions must be contiguous (strides {st})")
    inner *= tail[0]
    if shape[0] <= 1:
        return ptr, shape[0], inner // isz
    if st[0] % isz or (packed and st[0] != inner):
        raise ValueError(f"{name}: must be contiguous" if packed else f"{name}: bad row stride")
    return ptr, shape[0], st[0] // isz


@dataclass(frozen=True, eq=False)
class Items:
    """Work items: item i = (q row ``row[i]``, blocks ``ptrs[first[i]:first[i+1]]`` in that
    order, ``last[i]`` tokens in its last block -- 1..bs -- the others full). ``masks`` (sparse
    attention): ``[len(ptrs), H_kv]`` uint64, bit t = token t of that block is attended by that
    KV head, 0 = the head skips the block (its rows are not read); ``None`` = every token.
    int64 / uint64 arrays (converted if need be); treat them as immutable once built."""

    row: np.ndarray        # [N]
    first: np.ndarray      # [N + 1]
    last: np.ndarray       # [N]
    ptrs: np.ndarray       # [n_blocks]
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        for f in ("row", "first", "last", "ptrs"):
            object.__setattr__(self, f, _i64(getattr(self, f)))
        if self.masks is not None:
            m = np.ascontiguousarray(self.masks, dtype=np.uint64)
            if m.ndim == 1 and len(self.ptrs):
                m = m.reshape(len(self.ptrs), -1)
            if m.ndim != 2 or m.shape[0] != len(self.ptrs):
                raise ValueError(f"Items: masks {m.shape}, expected [{len(self.ptrs)}, H_kv]")
            object.__setattr__(self, "masks", m)
        n = len(self.row)
        if len(self.first) != n + 1 or len(self.last) != n or (n and self.first[-1] > len(self.ptrs)):
            raise ValueError("Items: row, first, last and ptrs disagree in length")
        # per-call work done once: the arrays' addresses (valid while the Items lives: it holds
        # them), and the rows needed of q (a negative row reads as huge: one reduction)
        object.__setattr__(self, "_addr", (_ptr(self.row), _ptr(self.first), _ptr(self.last), _ptr(self.ptrs),
                                           None if self.masks is None else _ptr(self.masks)))
        object.__setattr__(self, "_rows_needed", int(self.row.view(np.uint64).max()) + 1 if n else 0)

    @property
    def n(self) -> int:
        return len(self.row)

    @classmethod
    def build(cls, rows: Sequence[int], ptrs: Sequence[np.ndarray], last: Sequence[int],
              masks: Sequence[np.ndarray] | None = None) -> Items:
        """One item per entry: q row ``rows[i]``, slot addresses ``ptrs[i]``, ``last[i]`` tokens
        in its last block, ``masks[i]`` ``[len(ptrs[i]), H_kv]`` (or ``masks=None``)."""
        first = np.zeros(len(ptrs) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in ptrs], out=first[1:])
        flat = np.concatenate([_i64(p) for p in ptrs]) if len(ptrs) else np.zeros(0, np.int64)
        m = None
        if masks is not None:
            m = np.concatenate([np.asarray(x, dtype=np.uint64) for x in masks]) if len(masks) else np.zeros((0, 1), np.uint64)
        return cls(_i64(rows), first, _i64(last), flat, m)

    @classmethod
    def chunked(cls, rows: Sequence[int], ptrs: Sequence[np.ndarray], n_tokens: Sequence[int], block_size: int,
                chunk_blocks: int = 16, masks: Sequence[np.ndarray] | None = None) -> tuple[Items, np.ndarray]:
        """The canonical cut of each row's sequence: its full blocks in chunks of
        ``chunk_blocks`` (block 0.., block chunk_blocks.., ...; the last chunk may be shorter),
        then the partly filled last block (the tail) as an item of its own. ``ptrs[r]``: the
        slot addresses of row r's blocks (at least ceil(n_tokens[r] / bs)); ``masks[r]``:
        ``[n_blocks, H_kv]``. Returns the items (row by row, chunk order, tail last) and
        ``row_first`` ``[R + 1]``: row r's parts are items ``row_first[r]:row_first[r+1]``
        -- the merge order."""
        bs = block_size
        it_rows, it_ptrs, it_last, it_masks = [], [], [], [] if masks is not None else None
        row_first = np.zeros(len(rows) + 1, dtype=np.int64)
        for r, (row, p, t) in enumerate(zip(rows, ptrs, n_tokens)):
            p = _i64(p)
            full, tail = divmod(int(t), bs)
            if len(p) < full + (tail > 0):
                raise ValueError(f"row {r}: {len(p)} blocks for {t} tokens")
            cuts = [(c, min(c + chunk_blocks, full), bs) for c in range(0, full, chunk_blocks)]
            if tail:
                cuts.append((full, full + 1, tail))
            for a, b, last in cuts:
                it_rows.append(row)
                it_ptrs.append(p[a:b])
                it_last.append(last)
                if it_masks is not None:
                    it_masks.append(np.asarray(masks[r], dtype=np.uint64)[a:b])
            row_first[r + 1] = row_first[r] + len(cuts)
        return cls.build(it_rows, it_ptrs, it_last, it_masks), row_first


class Append(NamedTuple):
    """Write token b's ``k[b]`` / ``v[b]`` (``[B, H_kv, D]`` each, the KV dtype's storage type:
    float32, bfloat16 tensor or uint16 array, float16; heads contiguous, any batch stride) into
    column ``cols[b]`` of the slot at address ``slots[b]`` before attending."""

    k: object
    v: object
    slots: np.ndarray      # [B] int64 slot addresses
    cols: np.ndarray       # [B] int64 token column in the slot


class Merge(NamedTuple):
    """Row r of ``out`` ``[R, H, D]`` / ``lse`` ``[R, H]`` (fp32, contiguous) merges the parts
    ``order[row_first[r]:row_first[r+1]]`` (``order=None``: the parts themselves, in index
    order) in that order."""

    row_first: np.ndarray  # [R + 1] int64
    order: np.ndarray | None
    out: object
    lse: object


class PagedAttention:
    """The native paged kernel for one KV dtype and geometry (``scale`` defaults to 1/sqrt(D));
    a compressed dtype (``int8`` / ``int4``: kv/layout.py's blocks, values in groups of
    ``group`` channels, 0 = the whole head) is read and dequantised in registers, and takes no
    append (its blocks are written whole)."""

    def __init__(self, dtype: str, H_kv: int, G: int, D: int, block_size: int, scale: float | None = None,
                 group: int = 0, lib: ctypes.CDLL | None = None) -> None:
        if not self.available(dtype, G, D, block_size, H_kv):
            raise RuntimeError(f"native paged attention unavailable for {dtype} H_kv={H_kv} G={G} D={D} bs={block_size}")
        self.dtype, self.H_kv, self.G, self.D, self.bs = dtype, H_kv, G, D, block_size
        self.group = group or D
        self.H = H_kv * G
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        # lib: another build of paged_attn.c (build.compile_variant: e.g. another ISA's path, in tests)
        self.fn = getattr(lib or load("paged_attn"), f"kvo_paged_attn_{_SUFFIX[dtype]}")
        self.fn.argtypes, self.fn.restype = _ATTN_ARGTYPES, ctypes.c_int

    @classmethod
    def for_layout(cls, layout, G: int, lib: ctypes.CDLL | None = None) -> PagedAttention | None:
        """The kernel for a kv/layout.py BlockLayout's blocks, or None where unavailable."""
        lay = layout
        if not cls.available(lay.dtype, G, lay.head_dim, lay.block_size, lay.num_kv_heads):
            return None
        return cls(lay.dtype, lay.num_kv_heads, G, lay.head_dim, lay.block_size, group=lay.group, lib=lib)

    def driver(self) -> int:
        """The address of this dtype's kernel driver with untyped k/v (``kvo_paged_attn_v_*``):
        what ``select.c``'s one-call sparse step and the prepared calls' hooks call (a compressed
        dtype's driver appends nothing: it rejects a call with new tokens)."""
        return ctypes.cast(getattr(load("paged_attn"), f"kvo_paged_attn_v_{_SUFFIX[self.dtype]}"), ctypes.c_void_p).value

    @staticmethod
    def available(dtype: str, G: int, D: int, block_size: int, H_kv: int = 1) -> bool:
        """Whether the kernel takes this geometry (token masks also need block_size <= MASK_BS_MAX)."""
        return (dtype in _SUFFIX and 1 <= G <= G_MAX and 2 <= D <= D_MAX and D % 2 == 0
                and 1 <= block_size <= BS_MAX and H_kv * G <= H_MAX and load("paged_attn") is not None)

    def __call__(self, q, items: Items, part_o, part_lse, threads: int, append: Append | None = None,
                 merge: Merge | None = None) -> None:
        """q ``[R, H, D]`` fp32 (heads contiguous, any row stride; over bf16 KV, scored by
        VDPBF16PS in one pass when a head's q is bf16-exact, else with its bf16 remainder too)
        -> ``part_o`` ``[N, H, D]``, ``part_lse`` ``[N, H]`` (fp32, contiguous; o = 0 and
        lse = -inf for a head that attends no token of the item). ``append``: written before
        the items are computed. ``merge``: the rows' outputs from this call's parts."""
        H, D, N = self.H, self.D, items.n
        q_ptr, R_q, q_rs = _rows(q, ("float32",), (H, D), "q")
        if items._rows_needed > R_q:
            raise ValueError("Items.row outside q")
        po, n_po, _ = _rows(part_o, ("float32",), (H, D), "part_o", True)
        pl, n_pl, _ = _rows(part_lse, ("float32",), (H,), "part_lse", True)
        if n_po < N or n_pl < N:
            raise ValueError(f"part_o / part_lse hold {min(n_po, n_pl)} items, need {N}")
        row, first, last, ptrs, tm = items._addr
        if tm is not None and ((len(items.ptrs) and items.masks.shape[1] != self.H_kv) or self.bs > MASK_BS_MAX):
            raise ValueError(f"masks: [n_blocks, H_kv={self.H_kv}] and block_size <= {MASK_BS_MAX}")
        n_app, k_ptr, k_bs, v_ptr, v_bs, a_slot, a_col = 0, None, 0, None, 0, None, None
        if append is not None and self.dtype in QUANT:
            raise ValueError("a compressed KV block is written whole: no append")
        if append is not None:
            st = _STORAGE[self.dtype]
            k_ptr, n_app, k_bs = _rows(append.k, st, (self.H_kv, D), "append.k")
            v_ptr, n_v, v_bs = _rows(append.v, st, (self.H_kv, D), "append.v")
            slots, cols = _i64(append.slots), _i64(append.cols)
            if not n_app == n_v == len(slots) == len(cols):
                raise ValueError("append: k, v, slots and cols disagree in length")
            a_slot, a_col = _ptr(slots), _ptr(cols)
        R, rf, order, o_ptr, l_ptr = 0, None, None, None, None
        if merge is not None:
            rf, order, o_ptr, l_ptr, R = _merge_args(merge, H, D)
        rc = self.fn(self.H_kv, self.G, D, self.bs,
                     n_app, k_ptr, k_bs, v_ptr, v_bs, a_slot, a_col,
                     N, q_ptr, q_rs, row, first, last, ptrs, tm, self.scale, po, pl,
                     R, None if rf is None else _ptr(rf), None if order is None else _ptr(order),
                     o_ptr, l_ptr, threads, self.group)
        if rc != 0:
            raise ValueError("native paged attention rejected its arguments: "
                             + {-1: "geometry", -2: "an item's block range or last_len",
                                -3: "merge row_first / order outside this call's parts"}.get(rc, str(rc)))


class _PagedCall(ctypes.Structure):
    """kvo_hook.h's kvo_paged_call (the same fields in the same order)."""
    _fields_ = [("driver", _P), *((n, ctypes.c_int32) for n in ("H_kv", "G", "D", "bs", "n_app", "N", "R", "threads",
                                                               "vgroup")),
                ("scale", ctypes.c_float),
                *((n, _P) for n in ("app_slot", "app_col", "item_row", "item_first", "item_last", "blk", "tmask",
                                    "part_o", "part_lse", "row_first", "order"))]


class PreparedCall:
    """One kernel call set up once and repeated (a decode step's layers, the steps within one
    block): its items, part buffers, append targets and merge rows are checked and resolved to
    addresses here; each call passes only what changes per layer — q, the new token's k/v, the
    output — and costs a few microseconds. Between calls the caller may change the *contents*
    of ``items.last`` and of ``append_cols`` in place (the tail grows by a token a step); their
    shapes and the other arrays must stay as they were."""

    def __init__(self, kern: PagedAttention, items: Items, threads: int, append_slots: np.ndarray | None = None,
                 append_cols: np.ndarray | None = None, merge_rows: np.ndarray | None = None,
                 parts: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """parts: the buffers the items' partials go to (``[N, H, D]`` / ``[N, H]`` fp32,
        contiguous: e.g. a share of a :class:`PairedCall`'s), else buffers of its own."""
        H, D, N = kern.H, kern.D, items.n
        if items.masks is not None and ((len(items.ptrs) and items.masks.shape[1] != kern.H_kv) or kern.bs > MASK_BS_MAX):
            raise ValueError(f"masks: [n_blocks, H_kv={kern.H_kv}] and block_size <= {MASK_BS_MAX}")
        self.kern, self.items, self.threads = kern, items, threads
        if parts is None:
            parts = np.empty((max(N, 1), H, D), np.float32), np.empty((max(N, 1), H), np.float32)
        po, pl = parts
        if (po.dtype != np.float32 or pl.dtype != np.float32 or po.shape[1:] != (H, D) or pl.shape[1:] != (H,)
                or len(po) < N or len(pl) < N or not (po.flags.c_contiguous and pl.flags.c_contiguous)):
            raise ValueError(f"parts: [>= {N}, {H}, {D}] / [>= {N}, {H}] fp32 contiguous")
        self.part_o, self.part_lse = po, pl
        self.n_app = 0 if append_slots is None else len(append_slots)
        if self.n_app and kern.dtype in QUANT:
            raise ValueError("a compressed KV block is written whole: no append")
        self.app = None
        if append_slots is not None:
            self.app = (_i64(append_slots), _i64(append_cols))
            if len(self.app[1]) != self.n_app:
                raise ValueError("append: slots and cols disagree in length")
        self.R = 0 if merge_rows is None else len(merge_rows) - 1
        self.merge_rows = None if merge_rows is None else _i64(merge_rows)
        if self.R:
            check_merge_rows(self.merge_rows, None, N)
        row, first, last, ptrs, tm = items._addr
        a_slot, a_col = (None, None) if self.app is None else (_ptr(self.app[0]), _ptr(self.app[1]))
        rf = None if self.merge_rows is None else _ptr(self.merge_rows)
        # the argument list of kvo_paged_attn_*; None marks what each call fills in
        self.args = [kern.H_kv, kern.G, D, kern.bs, self.n_app, None, 0, None, 0, a_slot, a_col,
                     N, None, 0, row, first, last, ptrs, tm, kern.scale, _ptr(self.part_o), _ptr(self.part_lse),
                     self.R, rf, None, None, None, threads, kern.group]
        self._hook = None

    def hook(self) -> AttnHook:
        """A ``kvo_attn_hook`` (kvo_hook.h) running this call with the q, k/v,
        out and lse its caller passes (decode.c's kvo_layer_decode): the prepared items, append
        targets and merge rows, read where they are (in-place updates of ``items.last`` and
        ``append_cols`` still count). Full-precision KV only; kept alive by this object."""
        if self._hook is None:
            if self.kern.dtype in QUANT or not self.R or self.n_app != self.R:
                raise ValueError("a hook needs an append and a merge row per new token (full-precision KV)")
            self._ctx = self.struct()
            self._hook = AttnHook.of(load("paged_attn"), "kvo_paged_hook", self._ctx, self)
        return self._hook

    def struct(self) -> _PagedCall:
        """This call as kvo_hook.h's kvo_paged_call (pointing at this object's arrays: keep it alive)."""
        kern, a = self.kern, self.args
        return _PagedCall(kern.driver(), kern.H_kv, kern.G, kern.D, kern.bs, self.n_app, a[11], self.R,
                          self.threads, kern.group, kern.scale, a[9], a[10], *a[14:19], a[20], a[21], a[23], None)

    def __call__(self, q, k_new=None, v_new=None, out=None, lse=None) -> None:
        """q ``[R_q, H, D]`` fp32; k_new / v_new ``[n_app, H_kv, D]`` (KV dtype) when prepared
        with append slots; out ``[R, H, D]`` / lse ``[R, H]`` fp32 contiguous when prepared with
        merge rows (else the partials are left in ``part_o`` / ``part_lse``)."""
        kern, a = self.kern, self.args
        H, D = kern.H, kern.D
        a[12], R_q, a[13] = _rows(q, ("float32",), (H, D), "q")
        if self.items._rows_needed > R_q:
            raise ValueError("Items.row outside q")
        if self.n_app:
            st = _STORAGE[kern.dtype]
            a[5], n_k, a[6] = _rows(k_new, st, (kern.H_kv, D), "k_new")
            a[7], n_v, a[8] = _rows(v_new, st, (kern.H_kv, D), "v_new")
            if n_k < self.n_app or n_v < self.n_app:
                raise ValueError("k_new / v_new hold fewer tokens than the prepared append")
        if self.R:
            a[25], n_o, _ = _rows(out, ("float32",), (H, D), "out", True)
            a[26], n_l, _ = _rows(lse, ("float32",), (H,), "lse", True)
            if n_o < self.R or n_l < self.R:
                raise ValueError(f"out / lse hold fewer than {self.R} rows")
        rc = kern.fn(*a)
        if rc != 0:
            raise ValueError(f"native paged attention rejected its arguments (rc {rc})")


class _PairCall(ctypes.Structure):
    """kvo_hook.h's kvo_paged_pair (the same fields in the same order)."""
    _fields_ = [("first", _P), ("second", _P), *((n, ctypes.c_int32) for n in ("R", "H", "D", "threads")),
                *((n, _P) for n in ("row_first", "order", "part_o", "part_lse"))]


class PairedCall:
    """Two prepared calls and one merge, as one native hook (kvo_hook.h's kvo_paged_pair): the
    tiered backend's decode layer over RAM (the tails' call, which appends the new tokens, and
    the blocks' call, of the stored dtype), run the way it runs them one by one -- each call's
    items into its share of one part buffer (rows ``[0, N1)``, then ``[N1, N1 + N2)``), then
    :func:`merge_parts` of those rows in ``order`` -- so it gives the same bits. Make the two
    calls with ``parts=`` :meth:`share` of this object's buffers."""

    def __init__(self, H: int, D: int, n_first: int, n_second: int) -> None:
        self.n = (n_first, n_second)
        self.part_o = np.empty((max(n_first + n_second, 1), H, D), np.float32)
        self.part_lse = np.empty((max(n_first + n_second, 1), H), np.float32)
        self.H, self.D, self._hook = H, D, None

    def share(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Call ``i``'s (0 or 1) rows of the part buffers."""
        a = 0 if i == 0 else self.n[0]
        return self.part_o[a:a + max(self.n[i], 1)], self.part_lse[a:a + max(self.n[i], 1)]

    def hook(self, first: PreparedCall, second: PreparedCall | None, row_first: np.ndarray, order: np.ndarray,
             threads: int) -> AttnHook:
        """The hook: ``first`` (appending one token per merge row), ``second`` (None when
        ``n_second`` is 0), then the merge of output row r from parts ``order[row_first[r]:
        row_first[r+1]]``. Kept alive, with both calls and the arrays, by the hook."""
        R = len(row_first) - 1
        if first.n_app != R or (second is not None and second.n_app):
            raise ValueError("a paired call appends one token per merge row, in its first call only")
        if (first.items.n, 0 if second is None else second.items.n) != self.n:
            raise ValueError("the calls' items disagree with the part buffers' shares")
        self._rf, self._order = _i64(row_first), _i64(order)
        check_merge_rows(self._rf, self._order, sum(self.n))
        self._calls = (first, second)
        self._structs = (first.struct(), None if second is None else second.struct())
        self._ctx = _PairCall(ctypes.addressof(self._structs[0]),
                              None if second is None else ctypes.addressof(self._structs[1]),
                              R, self.H, self.D, threads, _ptr(self._rf), _ptr(self._order),
                              _ptr(self.part_o), _ptr(self.part_lse))
        self._hook = AttnHook.of(load("paged_attn"), "kvo_paged_pair_hook", self._ctx, self)
        return self._hook


def _merge_args(merge: Merge, H: int, D: int):
    """(row_first, order) as int64 arrays (the caller keeps them alive through the call), the
    addresses of out and lse, and R. The indices are checked by the caller (C or Python)."""
    row_first = _i64(merge.row_first)
    R = len(row_first) - 1
    o_ptr, n_o, _ = _rows(merge.out, ("float32",), (H, D), "out", True)
    l_ptr, n_l, _ = _rows(merge.lse, ("float32",), (H,), "lse", True)
    if R < 0 or n_o < R or n_l < R:
        raise ValueError(f"out / lse hold {min(n_o, n_l)} rows, need {R}")
    order = None
    if merge.order is not None:
        order = _i64(merge.order)
        if R and len(order) < row_first[-1]:
            raise ValueError("merge order shorter than row_first says")
    return row_first, order, o_ptr, l_ptr, R


def check_merge_rows(row_first: np.ndarray, order: np.ndarray | None, n_parts: int) -> None:
    """The merge's indices (int64): ``row_first`` non-decreasing from >= 0, and every part a
    row names — ``order[row_first[0]:row_first[-1]]``, or those indices themselves when
    ``order`` is None — within ``[0, n_parts)`` (what the C merge reads, unchecked)."""
    if len(row_first) < 2:
        return
    lo, hi = row_first[0], row_first[-1]
    bad = lo < 0 or np.any(row_first[1:] < row_first[:-1]) or (order is not None and hi > len(order))
    idx = np.arange(lo, hi) if order is None else order[lo:hi]
    if bad or (len(idx) and (idx.min() < 0 or idx.max() >= n_parts)):
        raise ValueError("merge: row_first / order outside the parts")


def merge_parts(row_first, order, part_o, part_lse, out, lse, threads: int = 1) -> None:
    """Row r of ``out`` ``[R, H, D]`` / ``lse`` ``[R, H]`` := the merge of the parts
    ``order[row_first[r]:row_first[r+1]]`` (``order=None``: in index order) of ``part_o``
    ``[P, H, D]`` / ``part_lse`` ``[P, H]`` (fp32, contiguous), in that order: the very
    function the merge inside :class:`PagedAttention` uses, so parts computed by several tiers
    or processes merge to the bits one call would give. Per (row, head): M = max lse over the
    parts (lse = -inf parts skipped; none: out = 0, lse = -inf), w = exp(lse - M),
    out = sum w o / sum w, lse = M + log sum w."""
    lib = load("paged_attn")
    if lib is None:
        raise RuntimeError("native paged attention unavailable")
    fn = lib.kvo_merge_parts
    fn.argtypes, fn.restype = _MERGE_ARGTYPES, None
    if len(part_o.shape) != 3:
        raise ValueError(f"part_o: shape {tuple(part_o.shape)}, expected [P, H, D]")
    H, D = tuple(part_o.shape)[1:]
    po, n_po, _ = _rows(part_o, ("float32",), (H, D), "part_o", True)
    pl, n_pl, _ = _rows(part_lse, ("float32",), (H,), "part_lse", True)
    if n_po != n_pl:
        raise ValueError("part_o and part_lse disagree in length")
    rf, order, o_ptr, l_ptr, R = _merge_args(Merge(row_first, order, out, lse), H, D)
    check_merge_rows(rf, order, n_po)
    fn(R, H, D, _ptr(rf), None if order is None else _ptr(order), po, pl, o_ptr, l_ptr, threads)


def merge_address() -> int:
    """The address of ``kvo_merge_parts`` (:func:`merge_parts`' function): what ``select.c``'s
    sparse step calls to merge parts attended by two drivers (compressed blocks, full-precision
    tails)."""
    return ctypes.cast(load("paged_attn").kvo_merge_parts, ctypes.c_void_p).value


def full_mask_row(bs: int, H_kv: int) -> np.ndarray:
    """``[1, H_kv]`` uint64: every token of a block, for every head."""
    return np.full((1, H_kv), (1 << bs) - 1, np.uint64)


def masks_to_valid(masks: np.ndarray, bs: int) -> np.ndarray:
    """``[n, H_kv]`` uint64 token masks -> ``[H_kv, n*bs]`` bool (token t of block i at i*bs+t)."""
    bits = (masks[:, :, None] >> np.arange(bs, dtype=np.uint64)) & np.uint64(1)     # [n, H_kv, bs]
    return bits.astype(bool).transpose(1, 0, 2).reshape(masks.shape[1], -1)


def read_bandwidth_probe():
    """The ``kvo_read_sum(ptr, n_floats, threads)`` function (for peak-bandwidth measurement)."""
    lib = load("paged_attn")
    if lib is None:
        return None
    fn = lib.kvo_read_sum
    fn.argtypes, fn.restype = [_P, _L, _I], ctypes.c_double
    return fn
