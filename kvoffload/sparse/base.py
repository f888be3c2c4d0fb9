"""The sparse-attention seam: what a policy is, and what it hands the attention backend.

A policy keeps small per-(sequence, layer) metadata, fed every appended token's k/v
(:meth:`SparsePolicy.append`), and each decode step scores the candidate blocks or tokens of
every KV head against the query (:meth:`SparsePolicy.score`, the one method a policy must
write). The base class turns scores into a :class:`Selection`: sink blocks, the recent window
and the partial tail block always, then the best-scored candidates up to the budget. Backends
read only what a selection names, block-granular (a chosen token costs its whole block of
that head); what they read against what was chosen is the read amplification they report.

Two implementations of one step: :meth:`SparsePolicy.select_batch` makes ONE native call per
layer for the whole batch (``kvoffload/kernels/select.c``: append, score, top-k, union) on CPU
tensors; :meth:`SparsePolicy.select_batch_reference` / :meth:`SparsePolicy.select` are the
PyTorch reference (CUDA tensors, ``policy.native = False``, no compiler, ``KVOFFLOAD_NO_KERNELS=1``,
a subclass with its own scoring). Both read and append the same metadata: fp32 arrays whose
per-token part is tiled channel-major (:func:`tiled`), grown in Python (:meth:`SparsePolicy.reserve`).

Budget accounting (per layer and KV head): ``budget_tokens(T)`` attended tokens, sinks and the
recent window included; a budget that covers the sequence picks everything (so every policy
at full budget is dense attention, bit for bit up to summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvoffload.config import ModelConfig, SparseConfig
from kvoffload.errors import ConfigError
from kvoffload.kernels.limits import D_MAX, G_MAX
from kvoffload.kernels.paged import masks_to_valid
from kvoffload.kernels.select import (
    INFO_CHOSEN,
    INFO_READ,
    POLICY_IDS,
    ST_COLS,
    NativeSelect,
)
from kvoffload.kernels.select import TILE as SELECT_TILE


def full_mask(bs: int) -> np.uint64:
    """Every token of a ``bs``-token block (bit t = token t)."""
    return np.uint64((1 << bs) - 1)


class Selection:
    """What one sequence attends at one layer in one decode step, per KV head. The tail block
    (positions ``n_full*bs .. T-1``, the current token included) is always attended whole.

    blocks: ``[H_kv]`` sorted indices of the full blocks each head attends.
    masks: ``[H_kv]`` per chosen block, its attended tokens (uint64, bit t = token t), or
        ``None``: the whole blocks (block-granular policies).
    alpha, vmean: SparF's correction: ``alpha`` ``[H]`` is the approximate score mass of the
        attended tokens, ``vmean`` ``[H_kv, D]`` the mean of all values; the output becomes
        ``alpha * o + (1 - alpha) * vmean``. ``None`` for other policies.

    Built either per head (``Selection(blocks, masks)``: the PyTorch reference) or, by the
    native selection, from the union the backends read (``Selection(union=(blocks, masks),
    whole=..., counts=(read, chosen))``): then :meth:`union` and the counts cost nothing, and
    the per-head ``blocks`` / ``masks`` are derived on first use (``whole``: every chosen block
    is attended whole, so the per-head masks are ``None``).
    """

    __slots__ = ("_blocks", "_counts", "_masks", "_union", "_whole", "alpha", "vmean")

    def __init__(self, blocks: list[np.ndarray] | None = None, masks: list[np.ndarray | None] | None = None,
                 alpha: torch.Tensor | None = None, vmean: torch.Tensor | None = None, *,
                 union: tuple[np.ndarray, np.ndarray] | None = None, whole: bool = False,
                 counts: tuple[int, int] | None = None) -> None:
        if blocks is None and union is None:
            raise ValueError("Selection: per-head blocks or a union")
        self._blocks = blocks
        self._masks = masks if masks is not None or blocks is None else [None] * len(blocks)
        self.alpha, self.vmean = alpha, vmean
        self._union = union               # (blocks [n] int64, masks [n, H_kv] uint64)
        self._whole = whole
        self._counts = counts             # (blocks read over heads, tokens chosen over heads)

    def _split(self) -> None:
        """Per-head blocks / masks from the union."""
        allb, m = self._union
        nz = m != 0                                                        # [n, H_kv]
        H_kv = m.shape[1]
        self._blocks = [allb[nz[:, h]] for h in range(H_kv)]
        self._masks = [None] * H_kv if self._whole else [m[nz[:, h], h] for h in range(H_kv)]

    @property
    def blocks(self) -> list[np.ndarray]:
        if self._blocks is None:
            self._split()
        return self._blocks

    @property
    def masks(self) -> list[np.ndarray | None]:
        if self._blocks is None:
            self._split()
        return self._masks

    @property
    def num_kv_heads(self) -> int:
        return len(self._blocks) if self._blocks is not None else self._union[1].shape[1]

    def corrected(self, o: torch.Tensor) -> torch.Tensor:
        """o ``[H, D]`` over the attended tokens -> the policy's output (SparF's mix with mean(V))."""
        return o if self.alpha is None else mean_mix(o, self.alpha, self.vmean)

    def chosen_tokens(self, bs: int) -> int:
        """Tokens chosen among the full blocks, summed over the heads."""
        if self._counts is not None:
            return self._counts[1]
        n = 0
        for b, m in zip(self.blocks, self.masks):
            n += len(b) * bs if m is None else int(np.unpackbits(np.ascontiguousarray(m).view(np.uint8)).sum())
        return n

    def read_blocks(self) -> int:
        """Full blocks read, summed over the heads (a block counts once per head that reads it)."""
        if self._counts is not None:
            return self._counts[0]
        return sum(len(b) for b in self.blocks)

    def union(self, bs: int) -> tuple[np.ndarray, np.ndarray]:
        """(blocks any head attends, sorted; their ``[n, H_kv]`` uint64 token masks, 0 where
        that head skips the block): the per-block form the paged kernel reads."""
        if self._union is not None:
            return self._union
        H_kv = len(self.blocks)
        allb = np.unique(np.concatenate(self.blocks)) if H_kv else np.zeros(0, np.int64)
        masks = np.zeros((len(allb), H_kv), np.uint64)
        for h, (b, m) in enumerate(zip(self.blocks, self.masks)):
            rows = np.searchsorted(allb, b)
            masks[rows, h] = full_mask(bs) if m is None else m
        self._union = allb.astype(np.int64, copy=False), masks
        return self._union

    def token_index(self, length: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([H_kv, T_max] int64 token positions, [H_kv, T_max] bool valid)`` of every attended
        token per head (chosen blocks' tokens, then the tail), padded to the longest head."""
        n_full = (length - 1) // bs
        tail = np.arange(n_full * bs, length, dtype=np.int64)
        offs = np.arange(bs, dtype=np.int64)
        if all(m is None for m in self.masks) and len({len(b) for b in self.blocks}) == 1:
            blocks = np.stack(self.blocks)                                  # [H_kv, n]: no padding
            toks = (blocks[:, :, None] * bs + offs).reshape(len(blocks), -1)
            idx = np.concatenate([toks, np.broadcast_to(tail, (len(blocks), len(tail)))], axis=1)
            return torch.from_numpy(idx), torch.ones(idx.shape, dtype=torch.bool)
        per_head = []
        for b, m in zip(self.blocks, self.masks):
            toks = (b[:, None] * bs + offs).reshape(len(b), bs)
            if m is not None:
                toks = toks[masks_to_valid(m[:, None], bs)[0].reshape(len(b), bs)]
            per_head.append(np.concatenate([toks.ravel(), tail]))
        T = max(len(t) for t in per_head)
        idx = np.zeros((len(per_head), T), np.int64)
        valid = np.zeros((len(per_head), T), bool)
        for h, t in enumerate(per_head):
            idx[h, :len(t)], valid[h, :len(t)] = t, True
        return torch.from_numpy(idx), torch.from_numpy(valid)


def mean_mix(o: torch.Tensor, alpha: torch.Tensor, vmean: torch.Tensor) -> torch.Tensor:
    """SparF's output correction: o ``[..., H, D]`` (attention over the chosen tokens) ->
    ``alpha * o + (1 - alpha) * mean(V)`` per query head; alpha ``[..., H]``, vmean ``[..., H_kv, D]``."""
    a = alpha.to(o.device, o.dtype)[..., None]                                   # [..., H, 1]
    vbar = vmean.to(o.device, o.dtype).repeat_interleave(o.shape[-2] // vmean.shape[-2], -2)   # [..., H, D]
    return a * o + (1 - a) * vbar


@dataclass
class SparseCounters:
    """What sparse decode steps read, cumulative over (sequence, sparse layer) steps.

    context: tokens in the sequences (what dense attention would read). attended: tokens
    attended (chosen + tail), over KV heads. read: tokens in the blocks read for them
    (block-granular), over KV heads. bytes_per_token: K+V bytes of one token of one head.
    """

    steps: int = 0
    context: int = 0
    attended: int = 0
    read: int = 0
    bytes_per_token: int = 0

    def add(self, sel: Selection, length: int, bs: int, bytes_per_token: int) -> None:
        self.add_batch((length - 1,), sel.read_blocks(), sel.chosen_tokens(bs), sel.num_kv_heads, bs, bytes_per_token)

    def add_batch(self, starts: tuple[int, ...], read_blocks: int, chosen: int, H_kv: int, bs: int,
                  bytes_per_token: int) -> None:
        """:meth:`add` for a batch's step at once: ``read_blocks`` / ``chosen`` summed over its
        sequences (a native step's counts, kernels/select.py's info columns)."""
        lengths = sum(starts) + len(starts)
        tails = sum(s % bs for s in starts) + len(starts)                       # tail tokens, this one included
        self.steps += len(starts)
        self.context += lengths * H_kv
        self.attended += chosen + tails * H_kv
        self.read += read_blocks * bs + tails * H_kv
        self.bytes_per_token = bytes_per_token

    def add_native(self, starts: tuple[int, ...], info: np.ndarray, H_kv: int, bs: int, bytes_per_token: int) -> None:
        """:meth:`add_batch` from a native step's per-sequence counts (info ``[B, INFO_COLS]``,
        kernels/select.py)."""
        sums = info.sum(axis=0)
        self.add_batch(starts, int(sums[INFO_READ]), int(sums[INFO_CHOSEN]), H_kv, bs, bytes_per_token)

    def finish(self, chosen: list[Selection], o: torch.Tensor, starts: tuple[int, ...], bs: int,
               bytes_per_token: int) -> torch.Tensor:
        """After a batch's sparse step: count what its selections read and apply their output
        correction (SparF's) to o ``[B, H, D]`` (the attention over the chosen tokens)."""
        for b, (sel, s) in enumerate(zip(chosen, starts)):
            self.add(sel, s + 1, bs, bytes_per_token)
            if sel.alpha is not None:
                o[b] = sel.corrected(o[b])
        return o

    @property
    def read_fraction(self) -> float:
        """Tokens read / tokens a dense step would read."""
        return self.read / max(1, self.context)

    @property
    def amplification(self) -> float:
        """Tokens read / tokens attended (1 = block-exact choice)."""
        return self.read / max(1, self.attended)


class SparsePolicy:
    """Base of every policy. A subclass sets its paper's defaults as class attributes and
    writes :meth:`score` (and :meth:`new_state` / :meth:`append` when it keeps metadata).

    :attr:`unit`: tokens per scored candidate. ``bs``: whole blocks, read and attended whole.
        Smaller (1 = single tokens, or a chunk that divides ``bs``): a block is read when any of
        its units is chosen and only the chosen tokens are attended (InstInfer's
        page-then-token filtering).
    dense_layers, sink_tokens, recent_tokens: defaults of the matching :class:`SparseConfig`
        fields.
    """

    name: ClassVar[str] = ""
    native_name: ClassVar[str | None] = None   # the native selection it shares (default: its own name)
    rebuilds_keys: ClassVar[bool] = False       # attends some chosen tokens with keys of its own (shadowkv_lowrank)
    dense_layers: ClassVar[tuple[int, ...]] = ()
    sink_tokens: ClassVar[int] = 0
    recent_tokens: ClassVar[int] = 0

    def __init__(self, cfg: SparseConfig, model: ModelConfig, block_size: int, device: torch.device) -> None:
        self.cfg, self.model, self.bs, self.device = cfg, model, block_size, device
        self.H_kv, self.D = model.num_kv_heads, model.head_dim
        self.G = model.num_heads // model.num_kv_heads
        layers = cfg.sparse_dense_layers if cfg.sparse_dense_layers is not None else self.dense_layers
        bad = [x for x in layers if x >= model.num_layers]
        if bad:
            raise ConfigError(f"sparse_dense_layers {bad}: the model has {model.num_layers} layers")
        self.dense = frozenset(layers)
        self.sink = cfg.sparse_sink_tokens if cfg.sparse_sink_tokens is not None else self.sink_tokens
        self.recent = cfg.sparse_recent_tokens if cfg.sparse_recent_tokens is not None else self.recent_tokens
        if self.unit != block_size and (block_size > 64 or block_size % self.unit):
            raise ConfigError(f"{self.name}: selecting {self.unit}-token units needs a block size that is a "
                              f"multiple of {self.unit} and at most 64, got {block_size}")
        self.states: dict[int, list] = {}
        self.native = True                  # False: the PyTorch reference (select, one sequence at a time)
        self.native_lib = None              # a loaded select.c to use instead of the cached build (tests)
        self.threads = torch.get_num_threads()
        self._kernel: NativeSelect | None | bool = None      # False: unavailable; None: not tried yet
        self._gen = 0                       # bumped whenever a state's arrays may have moved
        self._tables: dict[int, tuple] = {}  # layer -> (seq_ids, gen, [B, ST_COLS] table, min capacity)

    # ---- metadata lifecycle ----
    def sparse(self, layer: int) -> bool:
        return layer not in self.dense

    def allocate(self, seq_id: int, capacity: int) -> None:
        self._gen += 1
        self.states[seq_id] = [self.new_state(i, capacity) if self.sparse(i) else None
                               for i in range(self.model.num_layers)]

    def free(self, seq_id: int) -> None:
        self._gen += 1
        self.states.pop(seq_id, None)

    def new_state(self, layer: int, capacity: int) -> object:
        """Per-(sequence, layer) metadata for up to ``capacity`` tokens."""
        return None

    def append(self, layer: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v ``[H_kv, L, D]`` (post-RoPE, as stored) of positions ``start .. start+L-1``."""
        if self.sparse(layer):
            self.update(self.states[seq_id][layer], start, k, v)

    def update(self, state: object, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fold appended tokens into ``state`` (default: no metadata)."""

    def prefilled(self, layer: int, seq_id: int, length: int) -> None:
        """The prompt's last chunk is appended (``length`` tokens): work a policy does once
        over the prefill (shadowkv_lowrank: its SVD) can be done now, as prefill (default: none)."""

    # ---- the one scoring method ----
    def score(self, state: object, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        """Scores ``[H_kv, (hi-lo)*bs/unit]`` of the candidate units (of ``unit`` tokens) in the
        full blocks ``lo .. hi-1``; higher is kept first. q ``[H_kv, G, D]`` fp32 (post-RoPE);
        ``length`` tokens in the sequence now, this one included."""
        raise NotImplementedError

    @property
    def unit(self) -> int:
        """Tokens per scored candidate: 1 (token-granular), ``bs`` (whole blocks) or a chunk."""
        return self.bs

    # ---- selection ----
    def select_batch(self, layer: int, seq_ids: tuple[int, ...], q: torch.Tensor, starts: tuple[int, ...],
                     k: torch.Tensor, v: torch.Tensor) -> list[Selection]:
        """One decode step of a batch at a sparse layer: append each sequence's new token (k, v
        ``[B, H_kv, D]``, as stored, at position ``starts[b]``) to its metadata, then select for
        query q ``[B, H, D]`` over its ``starts[b] + 1`` tokens. One native call for the whole
        batch (``kernels/select.c``) when available; else :meth:`select_batch_reference`."""
        if not seq_ids:
            return []
        kern = self.native_kernel(q, k, v)
        if kern is None:
            return self.select_batch_reference(layer, seq_ids, q, starts, k, v)
        return self._selections(kern(starts, q, k, v, self.native_table(layer, tuple(seq_ids), starts),
                                     self.native_aux(layer)))

    def native_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> NativeSelect | None:
        """The native selection for a step over these tensors (q ``[B, H, D]``, k/v ``[B, H_kv,
        D]``), or None: the reference runs instead (``native`` off, no kernel, not CPU tensors
        of a native dtype)."""
        if not (q.is_cpu and k.is_cpu and v.is_cpu) or v.dtype is not k.dtype:
            return None
        return self.native_kernel_for(q.dtype, k.dtype)

    def native_kernel_for(self, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> NativeSelect | None:
        """:meth:`native_kernel` for CPU tensors of these dtypes."""
        kern = (self._kernel if self._kernel is not None else self._load_kernel()) if self.native else None
        if not kern or q_dtype not in _NATIVE_DTYPES or kv_dtype not in _NATIVE_DTYPES:
            return None
        return kern

    def predict_batch(self, layer: int, seq_ids: tuple[int, ...], q: torch.Tensor,
                      starts: tuple[int, ...]) -> list[Selection]:
        """What :meth:`select_batch` would choose at ``layer`` for query ``q`` ``[B, H, D]`` (another
        layer's: a guess made before this layer's own query exists), appending nothing: the
        next layer's reads can start early (Double Sparsity's offloading variant, InfiniGen).
        Only moves I/O earlier; the step still attends what its own selection chooses."""
        if not seq_ids:
            return []
        kern = (self._kernel if self._kernel is not None else self._load_kernel()) if self.native else None
        if not kern or not q.is_cpu or q.dtype not in _NATIVE_DTYPES:
            return [self.select(layer, sid, q[b], s + 1) for b, (sid, s) in enumerate(zip(seq_ids, starts))]
        return self._selections(kern(starts, q, None, None, self.native_table(layer, tuple(seq_ids), starts),
                                     self.native_aux(layer)))

    def _selections(self, out) -> list[Selection]:
        """The native call's result as one :class:`Selection` per sequence."""
        blocks, masks, whole = out.blocks, out.masks, self.unit == self.bs
        if out.alpha is None:
            return [Selection(union=(blocks[b, :nb], masks[b, :nb]), whole=whole, counts=(read, chosen))
                    for b, (nb, read, chosen) in enumerate(out.info)]
        alpha, vmean = out.alpha.unbind(0), out.vmean.unbind(0)
        return [Selection(union=(blocks[b, :nb], masks[b, :nb]), whole=whole, counts=(read, chosen),
                          alpha=alpha[b], vmean=vmean[b])
                for b, (nb, read, chosen) in enumerate(out.info)]

    def select_batch_reference(self, layer: int, seq_ids: tuple[int, ...], q: torch.Tensor, starts: tuple[int, ...],
                               k: torch.Tensor, v: torch.Tensor) -> list[Selection]:
        """:meth:`select_batch` in PyTorch, one sequence at a time (the reference)."""
        out = []
        for b, (sid, s) in enumerate(zip(seq_ids, starts)):
            self.append(layer, sid, s, k[b, :, None], v[b, :, None])
            out.append(self.select(layer, sid, q[b], s + 1))
        return out

    # ---- the native path's view of the metadata ----
    def capacity(self, state: object) -> int:
        """Tokens ``state`` holds without growing (no metadata: unbounded)."""
        return 1 << 62

    def grow(self, state: object, tokens: int) -> None:
        """Reallocate ``state``'s arrays for at least ``tokens`` tokens, keeping their contents."""

    def reserve(self, state: object, tokens: int) -> None:
        """Room in ``state`` for ``tokens`` tokens (grown by doubling; the native tables of every
        layer are rebuilt after a growth, since the arrays moved)."""
        cap = self.capacity(state)
        if tokens > cap:
            self.grow(state, max(tokens, 2 * cap))
            self._gen += 1

    def native_row(self, state: object) -> tuple[int, ...]:
        """The state's row of the native table (``select.c``): (a0, a1, a2, hdr, cap) addresses
        and capacity."""
        return (0, 0, 0, 0, 0)

    def native_aux(self, layer: int) -> int:
        """The address of a per-layer array the kernel reads (double_sparsity's channels), or 0."""
        return 0

    def native_args(self) -> dict:
        """Policy constants of :class:`NativeSelect` beyond the common ones (r, outlier_share)."""
        return {}

    def _load_kernel(self) -> NativeSelect | bool:
        """The native selection of this policy (built once), or False: not a registered policy's
        own scoring, not on the CPU, a geometry past the kernel limits (G_MAX, D_MAX), or no
        kernel (no compiler, ``KVOFFLOAD_NO_KERNELS=1``)."""
        from kvoffload.sparse.registry import POLICIES

        cls = POLICIES.get(self.name)
        kname = self.native_name or self.name
        self._kernel = False
        if (cls is None or kname not in POLICY_IDS or self.device.type != "cpu" or self.G > G_MAX or self.D > D_MAX
                or any(getattr(type(self), f) is not getattr(cls, f)
                       for f in ("score", "update", "finish", "select", "geometry", "new_state"))):
            return False
        try:
            self._kernel = NativeSelect(kname, self.H_kv, self.G, self.D, self.bs, self.unit, self.sink,
                                        self.recent, self.cfg._budget, threads=self.threads, lib=self.native_lib,
                                        new_tensor=lambda shape: torch.empty(shape), **self.native_args())
        except RuntimeError:
            self._kernel = False
        return self._kernel

    def native_table(self, layer: int, seq_ids: tuple[int, ...], starts: tuple[int, ...]) -> int:
        """The address of the ``[B, ST_COLS]`` int64 native table of the batch's states at
        ``layer``, with room for each sequence's new token (cached per layer while the batch
        and the arrays stay)."""
        ent = self._tables.get(layer)
        if ent is None or ent[0] != seq_ids or ent[1] != self._gen:
            ent = self._build_table(layer, seq_ids)
        if max(starts) + 1 > ent[3]:
            for sid, s in zip(seq_ids, starts):
                self.reserve(self.states[sid][layer], s + 1)
            ent = self._build_table(layer, seq_ids)
        return ent[2]

    def _build_table(self, layer: int, seq_ids: tuple[int, ...]) -> tuple:
        table = np.zeros((len(seq_ids), ST_COLS), np.int64)
        cap = 1 << 62
        for b, sid in enumerate(seq_ids):
            st = self.states[sid][layer]
            table[b, :5] = self.native_row(st)
            cap = min(cap, self.capacity(st))
        ent = (seq_ids, self._gen, table.ctypes.data, cap, table)       # (the entry keeps the table alive)
        self._tables[layer] = ent
        return ent

    def geometry(self, length: int, budget: int | None = None) -> tuple[int, int, int, int]:
        """(n_full, lo, hi, k) of a sequence of ``length`` tokens: its full blocks; the
        candidates are blocks ``lo .. hi-1`` (blocks before lo are the sinks, from hi on the
        recent window: attended whole), of which the k best units are chosen. (``select.c``'s
        ``geometry`` computes the same.)"""
        bs = self.bs
        n_full = (length - 1) // bs
        tail = length - n_full * bs
        budget = self.cfg.budget_tokens(length) if budget is None else budget
        sink = min(-(-self.sink // bs), n_full)
        recent = min(max(0, -(-(self.recent - tail) // bs)), n_full - sink)
        recent = min(recent, max(0, (budget - tail) // bs - sink))
        lo, hi = sink, n_full - recent
        room = max(0, budget - tail - (sink + recent) * bs)             # tokens left for candidates
        return n_full, lo, hi, min(room // self.unit, (hi - lo) * bs // self.unit)

    def select(self, layer: int, seq_id: int, q: torch.Tensor, length: int, budget: int | None = None) -> Selection:
        """q ``[H, D]``: the current query; ``length``: tokens in the sequence, this one included;
        ``budget``: tokens to attend (default: the configured budget at this length)."""
        bs, H_kv, unit = self.bs, self.H_kv, self.unit
        n_full, lo, hi, k = self.geometry(length, budget)
        fixed = np.concatenate([np.arange(lo), np.arange(hi, n_full)]).astype(np.int64)
        state = self.states[seq_id][layer]
        qg = q.float().reshape(H_kv, self.G, self.D)                      # [H_kv, G, D]
        if k == 0:
            return self.finish(state, qg, length, [fixed] * H_kv, [None] * H_kv)
        scores = self.score(state, qg, lo, hi, length)                    # [H_kv, units]
        top = torch.topk(scores, k, dim=-1).indices.cpu().numpy() + lo * bs // unit   # [H_kv, k]
        if unit == bs:
            return self.finish(state, qg, length, [np.sort(np.concatenate([fixed, t])) for t in top], [None] * H_kv)
        per = bs // unit                                                  # units per block
        unit_bits = np.uint64((1 << unit) - 1)
        blocks, masks = [], []
        for t in top:
            blk, inv = np.unique(t // per, return_inverse=True)
            m = np.zeros(len(blk), np.uint64)
            np.bitwise_or.at(m, inv, np.left_shift(unit_bits, ((t % per) * unit).astype(np.uint64)))
            allb = np.concatenate([fixed, blk])
            allm = np.concatenate([np.full(len(fixed), full_mask(bs), np.uint64), m])
            order = np.argsort(allb, kind="stable")
            blocks.append(allb[order])
            masks.append(allm[order])
        return self.finish(state, qg, length, blocks, masks)

    def finish(self, state: object, q: torch.Tensor, length: int, blocks: list[np.ndarray],
               masks: list[np.ndarray | None]) -> Selection:
        """The selection (a policy that corrects the output, SparF, adds its terms here)."""
        return Selection(blocks, masks)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def group_max(s: torch.Tensor) -> torch.Tensor:
    """``[H_kv, G, n]`` per-query-head scores -> ``[H_kv, n]``: a candidate is as important as
    it is to the query head that needs it most (ShadowKV's GQA rule)."""
    return s.amax(dim=1)


def softmax_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


# ---- tiled channel-major metadata: what the native kernel reads ----
#
# Per-token (or per-block, per-chunk) metadata of C channels is kept [H_kv, tiles, C, TILE]:
# TILE consecutive columns (tokens, blocks or chunks) of every channel form one contiguous
# C x TILE tile. The kernel scores 16 columns with C vector multiply-adds and streams a tile from
# memory as a whole; growing appends tiles (nothing moves); the helpers below give PyTorch the
# plain [H_kv, C, columns] view of a column range.

TILE = SELECT_TILE


def tiled(H_kv: int, C: int, columns: int, fill: float | None, device: torch.device) -> torch.Tensor:
    """``[H_kv, tiles, C, TILE]`` fp32 for at least ``columns`` columns (``fill``, or uninitialised)."""
    shape = (H_kv, max(1, -(-columns // TILE)), C, TILE)
    return torch.empty(shape, device=device) if fill is None else torch.full(shape, fill, device=device)


def tiled_columns(x: torch.Tensor) -> int:
    return x.shape[1] * TILE


def tiled_grow(x: torch.Tensor, columns: int, fill: float | None) -> torch.Tensor:
    """``x`` with tiles appended for at least ``columns`` columns (its contents kept)."""
    more = tiled(x.shape[0], x.shape[2], columns - tiled_columns(x), fill, x.device)
    return torch.cat([x, more], dim=1)


def tiled_read(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Columns ``lo .. hi-1`` as ``[H_kv, C, hi-lo]``."""
    t0, t1 = lo // TILE, -(-hi // TILE)
    flat = x[:, t0:t1].transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)        # [H_kv, C, (t1-t0)*TILE]
    return flat[:, :, lo - t0 * TILE:hi - t0 * TILE]


def tiled_write(x: torch.Tensor, lo: int, cols: torch.Tensor) -> None:
    """Columns ``lo ..`` := cols ``[H_kv, C, n]``."""
    hi = lo + cols.shape[2]
    for t in range(lo // TILE, -(-hi // TILE)):
        a, b = max(lo, t * TILE), min(hi, (t + 1) * TILE)
        x[:, t, :, a - t * TILE:b - t * TILE] = cols[:, :, a - lo:b - lo]


def tiled_matmul(q: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """q ``[H_kv, G, C]`` times columns ``lo .. hi-1`` of x: ``[H_kv, G, hi-lo]``."""
    t0, t1 = lo // TILE, -(-hi // TILE)
    s = torch.matmul(q[:, None], x[:, t0:t1])                                      # [H_kv, tiles, G, TILE]
    return s.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)[:, :, lo - t0 * TILE:hi - t0 * TILE]
