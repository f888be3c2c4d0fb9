"""ctypes binding of ``select.c``: a sparse policy's selection for a whole batch in one call.

One call per (sparse layer, decode step): for every sequence and KV head it appends the new
token's metadata, scores the candidate units, keeps the top k (O(n) threshold search) and
writes each sequence's *union* -- the blocks any head attends and their ``[n, H_kv]`` uint64
token masks, the form the paged kernel reads -- plus what :class:`SparseCounters` needs and
SparF's correction terms. The per-(sequence, layer) metadata stays in the policy's fp32 arrays
(``kvoffload/sparse/``); each call gets a table of their addresses (:data:`ST_COLS` int64 per
sequence: see the top of ``select.c`` for what each policy puts there). Python guarantees
their capacity before the call; the kernel checks it and refuses (changing nothing) otherwise.

Thin by design (a few microseconds a call): arguments are not validated beyond what the C
side checks; torch tensors are duck-typed through ``data_ptr()`` / ``stride()`` (torch is not
imported here).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from kvoffload.dtypes import DTYPES
from kvoffload.kernels.build import load
from kvoffload.kernels.hook import AttnHook
from kvoffload.kernels.paged import merge_address

__all__ = ["INFO_CHOSEN", "INFO_COLS", "INFO_NBLOCKS", "INFO_READ", "POLICY_IDS", "ST_COLS", "TILE", "NativeSelect",
           "SelectOut", "SparseStep"]

POLICY_IDS = {"streaming": 0, "quest": 1, "sparf": 2, "double_sparsity": 3, "shadowkv": 4, "retrieval": 5}
ST_COLS = 6            # state table columns: a0, a1, a2, hdr (int64 counters), cap, unused
TILE = 128             # columns per tile of the tiled channel-major metadata (select.c's TILE)
INFO_COLS = 3          # per sequence: union blocks, blocks read (over heads), tokens chosen (over heads)
INFO_NBLOCKS, INFO_READ, INFO_CHOSEN = 0, 1, 2       # their columns (select.c's INFO_* enum)
# One thread below this much scoring work (multiply-adds over the batch, select.c's estimate):
# an OpenMP fork/join costs more than it saves. The scoring streams its metadata from memory
# (in a decode the KV evicts it from cache), so a second core pays from a few hundred thousand:
# 2 vs 1 thread at batch 1 (AVX2 EPYC, 28 layers' metadata in turn): Quest 2K 74K multiply-adds,
# equal; ShadowKV 2K 147K, 0.91x; Quest 4K 147K, 0.80x; Quest 8K 295K, 0.72x (`selection.md`).
PAR_MIN_WORK = 1 << 17
# Workspace: one slot (logits, keys) per (sequence, KV head) in flight, at most this many bytes
# in all (a bigger batch runs in waves).
WS_MAX_BYTES = 64 << 20

_DT_NAMES = {name: i for i, name in enumerate(DTYPES)}      # select.c's dtype codes: the table's order
_DT: dict = {}                 # dtype object -> select.c's code (filled on first sight)
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_ARGTYPES = [_P, _I, _P,                     # cfg, B, starts
             _P, _I, _L, _L,                 # q, dtype, batch / head strides (elements)
             _P, _P, _I, _L, _L, _L, _L,     # k, v, dtype, strides
             _P, _P, _L, _P,                 # table, channels, NB, out
             _P, _P]                         # alpha, vmean
_ERRORS = {-1: "bad geometry or arguments", -2: "a sequence's metadata is too small for this token",
           -3: "workspace too small", -4: "output too small"}


class _Config(ctypes.Structure):
    """select.c's sel_config (the same fields in the same order)."""

    _fields_ = [("policy", ctypes.c_int32), ("H_kv", ctypes.c_int32), ("G", ctypes.c_int32),
                ("D", ctypes.c_int32), ("bs", ctypes.c_int32), ("unit", ctypes.c_int32),
                ("sink_tokens", ctypes.c_int32), ("recent_tokens", ctypes.c_int32),
                ("budget_is_tokens", ctypes.c_int32), ("r", ctypes.c_int32),
                ("budget_value", ctypes.c_double), ("outlier_share", ctypes.c_double),
                ("par_min_work", ctypes.c_int64), ("ws", ctypes.c_void_p), ("ws_stride", ctypes.c_int64),
                ("slots", ctypes.c_int32), ("threads", ctypes.c_int32)]


def _addr(x: np.ndarray) -> int:
    """The data address of a writable C-contiguous non-empty array (cheaper than ``.ctypes.data``)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(x))


def _dtype_id(x) -> int:
    d = _DT.get(x.dtype)
    if d is None:
        d = _DT[x.dtype] = _DT_NAMES[str(x.dtype).rpartition(".")[2]]
    return d


class SelectOut(NamedTuple):
    """One call's results, B sequences. ``blocks`` ``[B, NB]`` int64 / ``masks`` ``[B, NB, H_kv]``
    uint64: row b's first ``info[b][0]`` entries are its union (sorted blocks; per block and KV
    head the attended tokens, bit t = token t, 0 = the head skips it). ``info``: per sequence
    (union blocks, blocks read summed over KV heads, tokens chosen summed over KV heads -- the
    tail not included), a list of B lists. ``alpha`` ``[B, H]`` / ``vmean`` ``[B, H_kv, D]`` fp32
    (SparF; else ``None``): numpy arrays or what ``new_tensor`` made."""

    blocks: np.ndarray
    masks: np.ndarray
    info: list
    alpha: object
    vmean: object


class NativeSelect:
    """The native selection of one policy: ``policy`` a :data:`POLICY_IDS` name, the model's
    geometry, the block size, ``unit`` (tokens per scored candidate), ``sink`` / ``recent``
    tokens, the budget as ``(kind, value)`` (``SparseConfig._budget``), ``r`` (channels,
    sparf / double_sparsity), ``outlier_share`` (shadowkv), ``threads`` (at most; one for small
    work). ``lib``: a loaded ``select.c`` (default: the cached build; tests pass other builds).
    ``new_tensor(shape)``: allocates alpha / vmean (fp32, contiguous) as the caller wants them
    (e.g. ``torch.empty``; default numpy)."""

    def __init__(self, policy: str, H_kv: int, G: int, D: int, block_size: int, unit: int, sink: int,
                 recent: int, budget: tuple[str, float], r: int = 0, outlier_share: float = 0.0,
                 threads: int = 1, lib: ctypes.CDLL | None = None, new_tensor=None) -> None:
        lib = lib if lib is not None else load("select")
        if lib is None:
            raise RuntimeError("native selection unavailable")
        self.lib = lib
        self.fn = lib.kvo_select
        self.fn.argtypes, self.fn.restype = _ARGTYPES, ctypes.c_int
        lib.kvo_select_tile.restype = ctypes.c_int
        if lib.kvo_select_tile() != TILE:
            raise RuntimeError(f"select.c tiles {lib.kvo_select_tile()} columns, select.py {TILE}")
        self._ws_floats = lib.kvo_select_ws
        self._ws_floats.argtypes, self._ws_floats.restype = [_P, _L], ctypes.c_int64
        self.policy, self.H_kv, self.G, self.D, self.bs = policy, H_kv, G, D, block_size
        self.cfg = _Config(POLICY_IDS[policy], H_kv, G, D, block_size, unit, sink, recent,
                           int(budget[0] == "tokens"), r, float(budget[1]), float(outlier_share),
                           PAR_MIN_WORK, None, 0, 0, max(1, int(threads)))
        self._cfg = ctypes.addressof(self.cfg)
        self.sparf = policy == "sparf"
        self.new_tensor = new_tensor
        self.ws = np.zeros(1, np.float32)
        self.ws_len = 0
        self._starts = np.zeros(16, np.int64)
        self._starts_addr = _addr(self._starts)

    @property
    def threads(self) -> int:
        return self.cfg.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self.cfg.threads = max(1, int(n))

    def _workspace(self, max_len: int, tasks: int) -> None:
        """Room for ``tasks`` (sequence, KV head) slots of ``max_len`` tokens (grown by doubling;
        at most WS_MAX_BYTES, or one slot)."""
        n = max(max_len, 2 * self.ws_len if max_len > self.ws_len else self.ws_len, 256)
        stride = int(self._ws_floats(self._cfg, n))
        slots = max(1, min(max(tasks, self.cfg.slots), WS_MAX_BYTES // (4 * stride)))
        self.ws = np.zeros(slots * stride, np.float32)
        self.ws_len = n
        self.cfg.ws, self.cfg.ws_stride, self.cfg.slots = _addr(self.ws), stride, slots

    def _prepare(self, starts: tuple[int, ...]) -> int:
        """Workspace and the starts buffer for a call over ``starts``; returns max(starts)."""
        B, top = len(starts), max(starts)
        cfg = self.cfg
        if top >= self.ws_len or (B * self.H_kv > cfg.slots and cfg.ws_stride * (cfg.slots + 1) * 4 <= WS_MAX_BYTES):
            self._workspace(top + 1, B * self.H_kv)
        if B > len(self._starts):
            self._starts = np.zeros(2 * B, np.int64)
            self._starts_addr = _addr(self._starts)
        self._starts[:B] = starts
        return top

    def _correction(self, B: int) -> tuple:
        """SparF's (alpha ``[B, H]``, vmean ``[B, H_kv, D]``) outputs and their addresses (other
        policies: Nones)."""
        if not self.sparf:
            return None, None, None, None
        H_kv, D = self.H_kv, self.D
        if self.new_tensor is None:
            alpha, vmean = np.empty((B, H_kv * self.G), np.float32), np.empty((B, H_kv, D), np.float32)
            return alpha, vmean, _addr(alpha), _addr(vmean)
        alpha, vmean = self.new_tensor((B, H_kv * self.G)), self.new_tensor((B, H_kv, D))
        return alpha, vmean, alpha.data_ptr(), vmean.data_ptr()

    def __call__(self, starts: tuple[int, ...], q, k, v, table: int, channels: int = 0) -> SelectOut:
        """starts: each sequence's new-token position (it then holds ``starts[b] + 1`` tokens).
        q ``[B, H, D]`` (fp32 / bf16 / fp16 CPU tensor, channels contiguous); k, v ``[B, H_kv, D]``
        (the KV dtype, channels contiguous; ``k=None``: no append); table: the address of the
        ``[B, ST_COLS]`` int64 state table; channels: the address of double_sparsity's
        ``[H_kv, r]`` int64 channels of the layer."""
        B = len(starts)
        top = self._prepare(starts)
        H_kv = self.H_kv
        NB = max(1, top // self.bs)
        # out: blocks [B, NB] | masks [B, NB, H_kv] | info [B, INFO_COLS], one allocation
        n_blk = B * NB
        n_msk = n_blk * H_kv
        buf = np.empty(n_blk + n_msk + B * INFO_COLS, np.int64)
        alpha, vmean, a_ptr, v_ptr = self._correction(B)
        qs = q.stride()
        if qs[2] != 1:                              # channels must be contiguous
            q = q.contiguous()
            qs = q.stride()
        if k is not None:
            ks, vs = k.stride(), v.stride()
            if ks[2] != 1 or vs[2] != 1:
                k, v = k.contiguous(), v.contiguous()
                ks, vs = k.stride(), v.stride()
            rc = self.fn(self._cfg, B, self._starts_addr, q.data_ptr(), _dtype_id(q), qs[0], qs[1],
                         k.data_ptr(), v.data_ptr(), _dtype_id(k), ks[0], ks[1], vs[0], vs[1],
                         table, channels or None, NB, _addr(buf), a_ptr, v_ptr)
        else:
            rc = self.fn(self._cfg, B, self._starts_addr, q.data_ptr(), _dtype_id(q), qs[0], qs[1],
                         None, None, 0, 0, 0, 0, 0, table, channels or None, NB, _addr(buf), a_ptr, v_ptr)
        if rc != 0:
            raise ValueError(f"native selection: {_ERRORS.get(rc, rc)}")
        return SelectOut(buf[:n_blk].reshape(B, NB), buf[n_blk:n_blk + n_msk].view(np.uint64).reshape(B, NB, H_kv),
                         buf[n_blk + n_msk:].reshape(B, INFO_COLS).tolist(), alpha, vmean)


class _StepPlan(ctypes.Structure):
    """select.c's step_plan (the same fields in the same order)."""

    _fields_ = [("cf", _P), ("attn", _P), ("G", ctypes.c_int32), ("chunk_blocks", ctypes.c_int32),
                ("threads", ctypes.c_int32), ("vgroup", ctypes.c_int32), ("scale", ctypes.c_float),
                ("pad_", ctypes.c_int32), ("slot_bytes", _L), ("cap_b", _L), ("NB", _L),
                ("sel_out", _P), ("row", _P), ("first", _P), ("last", _P), ("ptrs", _P), ("row_first", _P),
                ("app_slot", _P), ("app_col", _P), ("masks", _P), ("part_o", _P), ("part_lse", _P), ("dref", _P),
                ("dslot", _P), ("attn_blocks", _P), ("merge", _P), ("order", _P), ("vgroup_blocks", ctypes.c_int32),
                ("pad2_", ctypes.c_int32)]


# select.c's step-call words (its SC_* enum, in order): one int64 array filled per call
STEP_CALL = ("B", "starts", "q", "q_dt", "q_sb", "q_sh", "k", "v", "kv_dt", "k_sb", "k_sh", "v_sb", "v_sh",
             "table", "channels", "alpha", "vmean", "base", "qf", "qf_rs", "out", "lse", "items",
             "locs", "tails", "resident", "nres", "nref", "bitems")
_SC = {name: i for i, name in enumerate(STEP_CALL)}
_STEP_ERRORS = {-6: "k / v heads not contiguous", -7: "a block of the read tier was not filled in"}


# the call words SparseStep.hook sets (the layer's kvo_sparse_hook sets q, k, v, out, lse)
_HOOK_WORDS = [STEP_CALL.index(w) for w in ("B", "starts", "kv_dt", "table", "channels", "base")]


class _SparseHookCtx(ctypes.Structure):
    """select.c's sparse_hook_ctx: the step's plan and call words."""
    _fields_ = [("plan", _P), ("call", _P)]


class SparseStep:
    """A sparse decode layer in ONE native call (``select.c``'s ``kvo_sparse_step``): the
    selection of ``sel`` (a :class:`NativeSelect`), each sequence's union cut into items -- the
    runs within one chunk of ``chunk_blocks`` blocks, then the tail block
    (``attention/dense.py``'s ``DecodeItems``) -- and the paged kernel's append + attend + merge
    through ``driver`` (the address of ``paged_attn.c``'s ``kvo_paged_attn_v_<dtype>``,
    :meth:`PagedAttention.driver`). Same items and merge order as the Python path: the same
    bits. Its buffers grow with the batch and the context (by doubling).

    Two ways to say where the blocks are: :meth:`__call__` takes each sequence's slot 0 (its
    blocks contiguous: the in-memory backend); :meth:`plan` takes per sequence an int64 array
    of block locations (an address, or ``-(slot + 1)`` for a slot of a *read tier* whose
    address is ``resident[slot]`` once in RAM; the tiered backend's in-process tiers), leaves
    the read tier's blocks that are not held at address 0 (:attr:`refs`), and
    :meth:`attend` runs the attention once the caller has read them and filled them in."""

    def __init__(self, sel: NativeSelect, driver: int, G: int, chunk_blocks: int, threads: int, scale: float,
                 slot_bytes: int, vgroup: int, blocks: tuple[int, int] | None = None) -> None:
        lib = sel.lib
        if lib.kvo_sparse_step_words() != len(STEP_CALL):
            raise RuntimeError(f"select.c takes {lib.kvo_sparse_step_words()} step words, select.py {len(STEP_CALL)}")
        self.fn, self.fn_plan, self.fn_attend = lib.kvo_sparse_step, lib.kvo_sparse_plan, lib.kvo_sparse_attend
        for fn in (self.fn, self.fn_plan, self.fn_attend):
            fn.argtypes, fn.restype = [_P, _P], ctypes.c_int
        self.sel, self.G = sel, G
        self.struct = _StepPlan(cf=sel._cfg, attn=driver, G=G, chunk_blocks=chunk_blocks, threads=max(1, threads),
                               vgroup=vgroup, scale=scale, slot_bytes=slot_bytes)
        if blocks is not None:                  # blocks of another format than the tails' (compressed KV)
            self.struct.attn_blocks, self.struct.vgroup_blocks = blocks
            self.struct.merge = merge_address()
        self._plan = ctypes.addressof(self.struct)
        self.call = np.zeros(len(STEP_CALL), np.int64)
        self._call = _addr(self.call)
        self._hook = None
        self.cap_b = self.NB = 0

    @classmethod
    def reuse(cls, step: SparseStep | None, sel: NativeSelect, kernel, layout, threads: int,
              block_kernel=None) -> SparseStep:
        """``step`` when it runs ``sel``; else a new step of ``sel`` over ``kernel`` (a
        :class:`~kvoffload.kernels.paged.PagedAttention` of the full-precision tails, and of
        ``layout``'s blocks unless ``block_kernel``, of another dtype, attends those: compressed
        KV, only with :meth:`plan`)."""
        if step is not None and step.sel is sel:
            return step
        blocks = None
        if block_kernel is not None and block_kernel.dtype != kernel.dtype:
            blocks = (block_kernel.driver(), block_kernel.group)
        return cls(sel, kernel.driver(), kernel.G, layout.chunk_blocks, threads, kernel.scale, layout.slot_bytes,
                   kernel.group, blocks)

    def _grow(self, B: int, NB: int) -> None:
        """Buffers for ``B`` sequences of up to ``NB`` full blocks (doubling)."""
        self.cap_b = cap_b = max(B, self.cap_b)
        self.NB = NB = max(NB, 2 * self.NB if NB > self.NB else self.NB, 64)
        H_kv, D = self.sel.H_kv, self.sel.D
        H = H_kv * self.G
        n = cap_b * (NB + 1)                        # items (and their blocks): every block a run, + tails
        self._bufs = {
            "sel_out": np.empty(cap_b * NB * (1 + H_kv) + cap_b * INFO_COLS, np.int64),
            "row": np.empty(n, np.int64), "first": np.empty(n + 1, np.int64), "last": np.empty(n, np.int64),
            "ptrs": np.empty(n, np.int64), "row_first": np.empty(cap_b + 1, np.int64),
            "app_slot": np.empty(cap_b, np.int64), "app_col": np.empty(cap_b, np.int64),
            "masks": np.empty(n * H_kv, np.uint64), "part_o": np.empty(n * H * D, np.float32),
            "part_lse": np.empty(n * H, np.float32), "dref": np.empty(n, np.int64),
            "dslot": np.empty(n, np.int64), "order": np.empty(n, np.int64)}
        for name, buf in self._bufs.items():
            setattr(self.struct, name, _addr(buf))
        self.struct.cap_b, self.struct.NB = cap_b, NB
        self.ptrs, self.dref, self.dslot = self._bufs["ptrs"], self._bufs["dref"], self._bufs["dslot"]

    def _ready(self, starts: tuple[int, ...]) -> int:
        """The selection's workspace and starts, and buffers for a call over ``starts``; returns B."""
        B, top = len(starts), self.sel._prepare(starts)
        if B > self.cap_b or top // self.sel.bs > self.NB:
            self._grow(B, top // self.sel.bs)
        return B

    def _fill(self, starts: tuple[int, ...], q, k, v, table: int, channels: int, qf, out, lse, base: int,
              locs: int, tails: int, resident: np.ndarray | None) -> tuple:
        """The call words; returns (B, alpha, vmean)."""
        sel = self.sel
        B = self._ready(starts)
        alpha, vmean, a_ptr, v_ptr = sel._correction(B)
        D = sel.D
        if q.stride(2) != 1:
            q = q.contiguous()
        if k.stride()[1:] != (D, 1) or v.stride()[1:] != (D, 1):
            k, v = k.contiguous(), v.contiguous()
        if qf.stride()[1:] != (D, 1):
            qf = qf.contiguous()
        qs, ks, vs, fs = q.stride(), k.stride(), v.stride(), qf.stride()
        res, nres = (0, 0) if resident is None or not len(resident) else (_addr(resident), len(resident))
        self.call[:] = (B, sel._starts_addr, q.data_ptr(), _dtype_id(q), qs[0], qs[1], k.data_ptr(), v.data_ptr(),
                        _dtype_id(k), ks[0], ks[1], vs[0], vs[1], table, channels, a_ptr or 0, v_ptr or 0,
                        base, qf.data_ptr(), fs[0], out.data_ptr(), lse.data_ptr(), 0, locs, tails, res, nres, 0, 0)
        self._keep = (q, k, v, qf)                  # alive until attend()
        return B, alpha, vmean

    def hook(self, starts: tuple[int, ...], table: int, channels: int, base: np.ndarray | None, kv_dtype,
             locs: np.ndarray | None = None, tails: np.ndarray | None = None) -> AttnHook | None:
        """A ``kvo_attn_hook`` (kernels/kvo_hook.h; select.c's kvo_sparse_hook)
        running this step inside a fused decode layer's native call, which passes q (fp32: the
        selection's and the attention's query), the new tokens' k / v (``kv_dtype``), out and
        lse; the rest as :meth:`__call__` takes it (``base``), or as :meth:`plan` does (``locs``
        and ``tails``, every block held in RAM: no read tier). None for a policy with an output
        correction (SparF: :meth:`__call__` only). After the call, :meth:`info` holds its counts."""
        sel = self.sel
        if sel.sparf:
            return None
        B = self._ready(starts)
        c = self.call
        c[:] = 0
        c[_HOOK_WORDS] = (B, sel._starts_addr, _DT_NAMES[str(kv_dtype).rpartition(".")[2]], table, channels,
                          0 if base is None else _addr(base))
        if locs is not None:
            c[_SC["locs"]], c[_SC["tails"]] = _addr(locs), _addr(tails)
            self._keep = (locs, tails)              # alive until the hooked call is done
        if self._hook is None:
            lib = self.sel.lib
            self._hook_ctx = _SparseHookCtx(self._plan, self._call)
            self._hook = AttnHook.of(lib, "kvo_sparse_hook", self._hook_ctx, self)
        return self._hook

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise ValueError(f"native sparse step: {_STEP_ERRORS.get(rc) or _ERRORS.get(rc, rc)}")

    def info(self, B: int) -> np.ndarray:
        """``[B, INFO_COLS]``: the last call's per-sequence counts (:class:`SelectOut`'s info)."""
        at = B * self.NB * (1 + self.sel.H_kv)
        return self._bufs["sel_out"][at:at + B * INFO_COLS].reshape(B, INFO_COLS)

    def union(self, b: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ``b``'s union of the last call: (its blocks ``[n]``, masks ``[n, H_kv]``)."""
        n = int(self.info(B)[b, INFO_NBLOCKS])
        NB, H_kv, out = self.NB, self.sel.H_kv, self._bufs["sel_out"]
        masks = out[B * NB:B * NB * (1 + H_kv)].view(np.uint64).reshape(B, NB, H_kv)
        return out[b * NB:b * NB + n], masks[b, :n]

    def __call__(self, starts: tuple[int, ...], q, k, v, table: int, channels: int, base: np.ndarray, qf,
                 out, lse) -> tuple[np.ndarray, object, object]:
        """starts: each sequence's new-token position; q ``[B, H, D]`` (the selection's query, as
        :class:`NativeSelect` takes it); k, v ``[B, H_kv, D]`` (the KV dtype; heads contiguous);
        table / channels: as :class:`NativeSelect`; base ``[B]`` int64: the address of each
        sequence's slot 0 at this layer; qf ``[B, H, D]`` fp32 (heads contiguous): the attention's
        query; out ``[B, H, D]`` / lse ``[B, H]`` fp32 contiguous: the merged result. Returns
        (``[B, INFO_COLS]`` info as :class:`SelectOut`'s, SparF's alpha, vmean or Nones)."""
        B, alpha, vmean = self._fill(starts, q, k, v, table, channels, qf, out, lse, _addr(base), 0, 0, None)
        self._check(self.fn(self._plan, self._call))
        return self.info(B), alpha, vmean

    def plan(self, starts: tuple[int, ...], q, k, v, table: int, channels: int, locs: np.ndarray, tails: np.ndarray,
             resident: np.ndarray | None, qf, out, lse) -> tuple[np.ndarray, object, object]:
        """The selection and the items, no attention yet: as :meth:`__call__`, with ``locs``
        ``[B]`` int64 the addresses of each sequence's block-location arrays and ``tails`` ``[B]``
        its tail block's address; ``resident``: the read tier's slot -> address (0: not held).
        Then :attr:`refs` are the read tier's item blocks (indices into :attr:`ptrs`; 0 there:
        to be read), and :meth:`attend` finishes the layer."""
        B, alpha, vmean = self._fill(starts, q, k, v, table, channels, qf, out, lse, 0, _addr(locs), _addr(tails),
                                     resident)
        self._check(self.fn_plan(self._plan, self._call))
        return self.info(B), alpha, vmean

    @property
    def refs(self) -> tuple[np.ndarray, np.ndarray]:
        """The last :meth:`plan`'s read-tier item blocks: (their indices into :attr:`ptrs`, their
        slots)."""
        n = int(self.call[_SC["nref"]])
        return self.dref[:n], self.dslot[:n]

    def masks_of(self, at: np.ndarray) -> np.ndarray:
        """``[len(at), H_kv]`` uint64: the token masks of the last call's item blocks ``at``
        (indices into :attr:`ptrs`)."""
        return self._bufs["masks"].reshape(-1, self.sel.H_kv)[at]

    def attend(self) -> None:
        """Append + attend + merge of the last :meth:`plan` (every read-tier block filled in)."""
        self._check(self.fn_attend(self._plan, self._call))
        self._keep = None
