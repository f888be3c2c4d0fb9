"""ShadowKV with its low-rank keys (Sun et al., arXiv 2410.21465): the selection of
:mod:`kvoffload.sparse.shadowkv`, and the keys of the chosen chunks rebuilt from an SVD of the
prefill's pre-RoPE keys, RoPE applied at use.

When the prompt's last chunk is appended (or at the first decode step, when the prefill was not
seen ending: a shared prefix), each layer's prefill keys (``T0`` tokens) are taken back to
pre-RoPE (the inverse rotation at their positions) and factored, all KV heads together as ShadowKV does (``[T0, H_kv*D]``, one SVD per layer):
``K_pre ~= C @ W`` with ``C = U_r S_r`` ``[T0, r]`` (the KV dtype) and ``W = V_r^T`` ``[r, H_kv*D]``
(fp32), ``r`` = ``--sparse-rank`` (default ShadowKV's 160 of Llama-3-8B's 1024 key channels:
5/32 of ``H_kv*D``, 30 for SmolLM2's 3x64, 20 for Qwen2.5-0.5B's 2x64). The factors are what RAM
keeps of those keys; the prefill buffer of exact keys is dropped then.

Each step the selection is ShadowKV's (landmarks and min-cosines of the exact post-RoPE keys,
outlier chunks always kept, the native selection kernel). Then it is split:

* attended with exact keys, from the KV tiers as every policy: the sink and recent blocks, the
  outlier chunks (ShadowKV keeps their exact K and V), the tail, and the tokens appended after
  the factorisation (ShadowKV's generated tokens, kept exact);
* attended with rebuilt keys: the other chosen chunks of the prefill. Their values are read from
  the tier that holds them; their keys are ``RoPE(C[pos] @ W_h, pos)``, computed here.

The two parts merge by their log-sum-exp (:func:`merge_two`), in the same code on every
placement, so the in-memory and offloaded backends give bit-identical outputs.

Exactness: low-rank keys are approximate by design, so this policy at full budget is not dense
attention; at full rank (``--sparse-rank`` >= ``H_kv*D``) the factors reproduce the keys up to
fp32 rounding (tests: full rank against dense within 1e-4, the low-rank reconstruction error
against the SVD's own bound).

What it saves, per (sequence, layer) of ``T0`` prefill tokens: RAM keeps ``T0*r`` factor values
(+ ``r*H_kv*D`` fp32) instead of ``T0*H_kv*D`` key values (:meth:`ShadowKVLowRank.factor_bytes`);
a rebuilt chunk needs only its values from the tier below (:class:`LowRankCounters`). This
implementation keeps the exact keys in the KV store too (the dense layers, the other policies
and the persistent store read them) and reads a rebuilt chunk's block whole (K and V: the tiers
read whole slots), so the RAM and read savings are counted, not yet realised by the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvoffload.kernels.paged import masks_to_valid
from kvoffload.sparse.base import Selection, full_mask, softmax_scale
from kvoffload.sparse.shadowkv import Landmarks, ShadowKV


@dataclass
class LowRankKeys(Landmarks):
    """ShadowKV's landmarks plus the low-rank keys of one (sequence, layer)."""

    raw: list = field(default_factory=list)     # [(start, [H_kv, L, D] post-RoPE keys as stored)] until factored
    coef: torch.Tensor | None = None             # [T0, r] C = U_r S_r (the KV dtype)
    basis: torch.Tensor | None = None            # [H_kv, r, D] W = V_r^T per head (fp32)
    T0: int = -1                                 # tokens factored (-1: not yet)


@dataclass
class LowRankCounters:
    """What the rebuilt keys did, cumulative over (sequence, sparse layer) steps.

    rebuilt: tokens attended with rebuilt keys, over KV heads. v_only: tokens of the blocks a
    head reads for rebuilt chunks alone (no exact chunk of that head in the block), over KV
    heads: of these only the values are needed from the tier below, half of what
    :class:`SparseCounters` counts for them. factor_seconds: time spent in the SVDs."""

    steps: int = 0
    rebuilt: int = 0
    v_only: int = 0
    factor_seconds: float = 0.0


def merge_two(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint keys: o ``[H, D]``, lse ``[H]`` fp32 -> merged. A
    part with lse -inf has weight 0 (and ``o1`` comes back bit for bit)."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    s = w1 + w2
    return (o1 * w1[:, None] + o2 * w2[:, None]) / s[:, None], m + torch.log(s)


class ShadowKVLowRank(ShadowKV):
    name = "shadowkv_lowrank"
    native_name = "shadowkv"          # the selection is ShadowKV's: its native kernel
    rebuilds_keys = True
    rank_share = 160 / 1024           # ShadowKV's rank 160 of Llama-3-8B's 8 x 128 key channels

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        C = self.H_kv * self.D
        r = self.cfg.sparse_rank if self.cfg.sparse_rank is not None else max(1, round(self.rank_share * C))
        self.rank = min(r, C)
        self.lowrank = LowRankCounters()
        self._inv: torch.Tensor | None = None   # [D/2] RoPE inverse frequencies (fp32)

    def new_state(self, layer: int, capacity: int) -> LowRankKeys:
        st = super().new_state(layer, capacity)
        return LowRankKeys(st.land, st.mincos, st.pending)

    def update(self, st: LowRankKeys, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().update(st, start, k, v)
        if st.T0 < 0:
            st.raw.append((start, k.detach().clone()))

    def prefilled(self, layer: int, seq_id: int, length: int) -> None:
        st = self.states[seq_id][layer]
        if st is not None and st.T0 < 0:
            self.factor(st, length)

    # ---- the factors ----
    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) ``[n, D]`` at positions ``pos`` ``[n]`` (model/rope.py's tables)."""
        if self._inv is None:
            from kvoffload.model.rope import inverse_frequencies

            self._inv = inverse_frequencies(self.D, self.model.rope_theta, self.model.rope_scaling).float()
        freqs = torch.outer(pos.float(), self._inv)                                     # [n, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x ``[..., n, D]`` rotated by (cos, signed sin) ``[n, D]`` (apply_rope's formula)."""
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)

    def factor(self, st: LowRankKeys, length: int) -> None:
        """Factor the keys of the first ``length`` tokens (the prefill) and drop them."""
        t0 = time.perf_counter()
        raw, st.raw = st.raw, []
        if not raw or length <= 0 or raw[0][0] != 0:
            st.T0 = 0                                # (not from position 0: every key stays exact)
            return
        k = torch.cat([x for _, x in raw], dim=1)[:, :length].float()                   # [H_kv, T0, D] post-RoPE
        pos = torch.arange(k.shape[1])
        cos, sin = self._rope(pos)
        pre = self._rotate(k, cos, -sin)                                                 # the inverse rotation
        M = pre.transpose(0, 1).reshape(k.shape[1], self.H_kv * self.D)                  # [T0, H_kv*D]
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r = min(self.rank, S.shape[0])
        st.coef = (U[:, :r] * S[:r]).to(raw[0][1].dtype)                                 # [T0, r]
        st.basis = Vh[:r].reshape(r, self.H_kv, self.D).transpose(0, 1).contiguous()    # [H_kv, r, D]
        st.T0 = k.shape[1]
        self.lowrank.factor_seconds += time.perf_counter() - t0

    def keys(self, st: LowRankKeys, h: int, pos: torch.Tensor) -> torch.Tensor:
        """Head ``h``'s rebuilt post-RoPE keys ``[n, D]`` (fp32) at positions ``pos`` ``[n]``."""
        cos, sin = self._rope(pos)
        return self._rotate(st.coef[pos].float() @ st.basis[h], cos, sin)

    def factor_bytes(self) -> tuple[int, int]:
        """(bytes of the factors held, bytes of the exact keys they stand for), over every
        sequence and layer factored so far."""
        held = exact = 0
        for states in self.states.values():
            for st in states:
                if st is not None and st.coef is not None:
                    held += st.coef.numel() * st.coef.element_size() + st.basis.numel() * 4
                    exact += st.coef.shape[0] * self.H_kv * self.D * st.coef.element_size()
        return held, exact

    # ---- a step: split the selection, attend the rebuilt part ----
    def split_rebuilt(self, layer: int, seq_ids: tuple[int, ...], starts: tuple[int, ...], chosen: list[Selection],
                      ) -> tuple[list[Selection], list | None]:
        """ShadowKV's selections -> (what the backend attends with exact keys, the work of
        :meth:`attend_rebuilt`: per batch row with rebuilt chunks ``(b, state, blocks [n],
        masks [n, H_kv])``, or None). The exact selections keep the whole selection's counts."""
        bs, unit = self.bs, self.unit
        per, full = bs // unit, full_mask(bs)
        unit_bits = np.uint64((1 << unit) - 1)
        exact_sel, work = [], []
        for b, (sid, s, sel) in enumerate(zip(seq_ids, starts, chosen)):
            st = self.states[sid][layer]
            if st.T0 < 0:
                self.factor(st, s)                   # the first decode step: the prefill is s tokens
            blocks, masks = sel.union(bs)
            counts = (sel.read_blocks(), sel.chosen_tokens(bs))
            if st.T0 == 0 or not len(blocks):
                exact_sel.append(sel)
                continue
            length = s + 1
            _, lo, hi, k = self.geometry(length)
            keep = np.zeros(masks.shape, np.uint64)                                     # [n, H_kv] exact bits
            keep[(blocks < lo) | (blocks >= hi)] = full                                 # sinks, recent window
            first_tok = blocks * bs                                                     # not factored: exact
            late = np.where(first_tok >= st.T0, full,
                            np.where(first_tok + bs > st.T0,
                                     full & ~((np.uint64(1) << np.clip(st.T0 - first_tok, 0, bs - 1).astype(np.uint64))
                                              - np.uint64(1)), np.uint64(0)))
            keep |= late.astype(np.uint64)[:, None]
            if k and hi > lo:
                out = self.outliers(st, lo * per, hi * per, length).numpy() + lo * per  # [H_kv, n_out]
                for h in range(self.H_kv):
                    ob = out[h] // per
                    rows = np.searchsorted(blocks, ob)
                    ok = rows < len(blocks)
                    ok[ok] &= blocks[rows[ok]] == ob[ok]
                    np.bitwise_or.at(keep[:, h], rows[ok], np.left_shift(unit_bits, ((out[h][ok] % per) * unit).astype(np.uint64)))
            ex, rb = masks & keep, masks & ~keep
            e_rows, r_rows = ex.any(1), rb.any(1)
            exact_sel.append(Selection(union=(blocks[e_rows], ex[e_rows]), counts=counts, alpha=sel.alpha,
                                       vmean=sel.vmean))
            self.lowrank.v_only += int(((ex == 0) & (rb != 0)).sum()) * bs
            if r_rows.any():
                work.append((b, st, blocks[r_rows], rb[r_rows]))
        return exact_sel, (work or None)

    def attend_rebuilt(self, work: list, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, values,
                       ) -> torch.Tensor:
        """The rebuilt chunks of :meth:`split_rebuilt`'s work, attended with their rebuilt keys
        and merged into o ``[B, H, D]`` (lse ``[B, H]``: the exact part's). q ``[B, H, D]`` fp32;
        ``values(b, blocks)`` -> V ``[n, H_kv, bs, D]`` of batch row b's full blocks."""
        bs, G, D, H_kv = self.bs, self.G, self.D, self.H_kv
        scale = softmax_scale(D)
        o = o.clone()
        for b, st, blocks, masks in work:
            V = values(b, blocks)                                                       # [n, H_kv, bs, D]
            valid = masks_to_valid(masks, bs)                                           # [H_kv, n*bs]
            m = int(valid.sum(1).max())
            # every head's rebuilt tokens first (in order), padded to the longest head
            order = np.argsort(~valid, axis=1, kind="stable")[:, :m]                    # [H_kv, m]
            ok = torch.from_numpy(np.take_along_axis(valid, order, 1))                  # [H_kv, m]
            idx = torch.from_numpy(order)
            pos = torch.from_numpy((blocks[:, None] * bs + np.arange(bs)).reshape(-1))[idx]   # [H_kv, m]
            cos, sin = self._rope(pos.reshape(-1))
            pre = torch.bmm(st.coef[pos].float(), st.basis)                             # [H_kv, m, D] pre-RoPE
            k = self._rotate(pre, cos.view(H_kv, m, D), sin.view(H_kv, m, D))
            v = V.transpose(0, 1).reshape(H_kv, -1, D).gather(1, idx[..., None].expand(-1, -1, D)).float()
            s = torch.bmm(q[b].view(H_kv, G, D), k.transpose(1, 2)) * scale            # [H_kv, G, m]
            s.masked_fill_(~ok[:, None], float("-inf"))
            ls = torch.logsumexp(s, dim=-1)                                             # [H_kv, G] (-inf: none)
            p = torch.exp(s - torch.where(torch.isinf(ls), 0.0, ls)[..., None])
            o_r = torch.bmm(p, v).reshape(H_kv * G, D)
            o[b], _ = merge_two(o[b], lse[b], o_r, ls.reshape(H_kv * G))
            self.lowrank.rebuilt += int(valid.sum())
            self.lowrank.steps += 1
        return o
