"""The sparse-attention seam: what a policy is, and what it hands the attention backend.

A policy keeps small per-(sequence, layer) metadata, fed every appended token's k/v
(:meth:`SparsePolicy.append`), and each decode step scores the candidate blocks or tokens of
every KV head against the query (:meth:`SparsePolicy.score`, the one method a policy must
write). The base class turns scores into a :class:`Selection`: sink blocks, the recent window
and the partial tail block always, then the best-scored candidates up to the budget. Backends
read only what a selection names, block-granular (a chosen token costs its whole block of
that head); what they read against what was chosen is the read amplification they report.

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
from kvoffload.kernels.paged import masks_to_valid


def full_mask(bs: int) -> np.uint64:
    """Every token of a ``bs``-token block (bit t = token t)."""
    return np.uint64((1 << bs) - 1)


@dataclass
class Selection:
    """What one sequence attends at one layer in one decode step, per KV head. The tail block
    (positions ``n_full*bs .. T-1``, the current token included) is always attended whole.

    blocks: ``[H_kv]`` sorted indices of the full blocks each head attends.
    masks: ``[H_kv]`` per chosen block, its attended tokens (uint64, bit t = token t), or
        ``None``: the whole blocks (block-granular policies).
    alpha, vmean: SparF's correction: ``alpha`` ``[H]`` is the approximate score mass of the
        attended tokens, ``vmean`` ``[H_kv, D]`` the mean of all values; the output becomes
        ``alpha * o + (1 - alpha) * vmean``. ``None`` for other policies.
    """

    blocks: list[np.ndarray]
    masks: list[np.ndarray | None]
    alpha: torch.Tensor | None = None
    vmean: torch.Tensor | None = None

    def corrected(self, o: torch.Tensor) -> torch.Tensor:
        """o ``[H, D]`` over the attended tokens -> the policy's output (SparF's mix with mean(V))."""
        if self.alpha is None:
            return o
        a = self.alpha.to(o.device, o.dtype)[:, None]                          # [H, 1]
        vbar = self.vmean.to(o.device, o.dtype).repeat_interleave(o.shape[0] // self.vmean.shape[0], 0)
        return a * o + (1 - a) * vbar

    def chosen_tokens(self, bs: int) -> int:
        """Tokens chosen among the full blocks, summed over the heads."""
        n = 0
        for b, m in zip(self.blocks, self.masks):
            n += len(b) * bs if m is None else int(np.unpackbits(np.ascontiguousarray(m).view(np.uint8)).sum())
        return n

    def union(self, bs: int) -> tuple[np.ndarray, np.ndarray]:
        """(blocks any head attends, sorted; their ``[n, H_kv]`` uint64 token masks, 0 where
        that head skips the block): the per-block form the paged kernel reads."""
        H_kv = len(self.blocks)
        allb = np.unique(np.concatenate(self.blocks)) if H_kv else np.zeros(0, np.int64)
        masks = np.zeros((len(allb), H_kv), np.uint64)
        for h, (b, m) in enumerate(zip(self.blocks, self.masks)):
            rows = np.searchsorted(allb, b)
            masks[rows, h] = full_mask(bs) if m is None else m
        return allb.astype(np.int64, copy=False), masks

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
        tail = length - (length - 1) // bs * bs
        H_kv = len(sel.blocks)
        self.steps += 1
        self.context += length * H_kv
        self.attended += sel.chosen_tokens(bs) + tail * H_kv
        self.read += sum(len(b) for b in sel.blocks) * bs + tail * H_kv
        self.bytes_per_token = bytes_per_token

    def finish(self, chosen: list[Selection], o: torch.Tensor, starts: tuple[int, ...], bs: int,
               bytes_per_token: int) -> torch.Tensor:
        """After a batch's sparse step: count what its selections read and apply their output
        correction (SparF's) to o ``[B, H, D]`` (the attention over the chosen tokens)."""
        for b, (sel, s) in enumerate(zip(chosen, starts)):
            self.add(sel, s + 1, bs, bytes_per_token)
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

    # ---- metadata lifecycle ----
    def sparse(self, layer: int) -> bool:
        return layer not in self.dense

    def allocate(self, seq_id: int, capacity: int) -> None:
        self.states[seq_id] = [self.new_state(i, capacity) if self.sparse(i) else None
                               for i in range(self.model.num_layers)]

    def free(self, seq_id: int) -> None:
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
        query q ``[B, H, D]`` over its ``starts[b] + 1`` tokens. (This is the reference: one
        sequence at a time.)"""
        out = []
        for b, (sid, s) in enumerate(zip(seq_ids, starts)):
            self.append(layer, sid, s, k[b, :, None], v[b, :, None])
            out.append(self.select(layer, sid, q[b], s + 1))
        return out

    def select(self, layer: int, seq_id: int, q: torch.Tensor, length: int, budget: int | None = None) -> Selection:
        """q ``[H, D]``: the current query; ``length``: tokens in the sequence, this one included;
        ``budget``: tokens to attend (default: the configured budget at this length)."""
        bs, H_kv, unit = self.bs, self.H_kv, self.unit
        n_full = (length - 1) // bs
        tail = length - n_full * bs
        budget = self.cfg.budget_tokens(length) if budget is None else budget
        sink = min(-(-self.sink // bs), n_full)
        recent = min(max(0, -(-(self.recent - tail) // bs)), n_full - sink)
        recent = min(recent, max(0, (budget - tail) // bs - sink))
        lo, hi = sink, n_full - recent
        room = max(0, budget - tail - (sink + recent) * bs)             # tokens left for candidates
        fixed = np.concatenate([np.arange(sink), np.arange(hi, n_full)]).astype(np.int64)
        state = self.states[seq_id][layer]
        qg = q.float().reshape(H_kv, self.G, self.D)                      # [H_kv, G, D]
        k = min(room // unit, (hi - lo) * bs // unit)
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


def group_max(s: torch.Tensor) -> torch.Tensor:
    """``[H_kv, G, n]`` per-query-head scores -> ``[H_kv, n]``: a candidate is as important as
    it is to the query head that needs it most (ShadowKV's GQA rule)."""
    return s.amax(dim=1)


def softmax_scale(D: int) -> float:
    return 1.0 / math.sqrt(D)


class TokenStore:
    """Rows appended along a token axis: ``[H_kv, capacity, width]`` (grown by doubling)."""

    def __init__(self, H_kv: int, width: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty(H_kv, max(16, capacity), width, dtype=dtype, device=device)
        self.n = 0

    def write(self, start: int, rows: torch.Tensor) -> None:
        """rows ``[H_kv, L, width]`` at positions ``start ..``."""
        end = start + rows.shape[1]
        if end > self.data.shape[1]:
            grown = torch.empty(self.data.shape[0], max(end, 2 * self.data.shape[1]), self.data.shape[2],
                                dtype=self.data.dtype, device=self.data.device)
            grown[:, :self.n] = self.data[:, :self.n]
            self.data = grown
        self.data[:, start:end] = rows
        self.n = max(self.n, end)

    def view(self, n: int | None = None) -> torch.Tensor:
        return self.data[:, :self.n if n is None else n]
