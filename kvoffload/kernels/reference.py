"""Slow, obviously correct versions of the paged kernel's two operations, for the tests and the
fallbacks (CUDA, no C compiler): the same semantics, not the same bits (fp32: ~1e-5).

* :func:`attend_items` -- item i attends blocks ``first[i]:first[i+1]`` of ``k`` / ``v``
  (``[n_blocks, H_kv, bs, D]``, unpacked from slots by the caller: ``BlockLayout.unpack_blocks``),
  the last holding ``last[i]`` tokens, with q row ``row[i]``; ``masks`` ``[n_blocks, H_kv]``
  uint64 token masks (0: the head skips the block). Returns the partials ``part_o``
  ``[N, H, D]`` (normalised over the item's keys) and ``part_lse`` ``[N, H]``; a head that
  attends nothing gets o = 0, lse = -inf.
* :func:`merge_parts` -- row r merges parts ``order[row_first[r]:row_first[r+1]]`` (``order``
  None: in index order), in that order: M = max lse (lse = -inf parts skipped; none: out = 0,
  lse = -inf), w = exp(lse - M), out = sum w o / sum w, lse = M + log sum w.

numpy versions (import time: numpy only) and torch versions (``*_torch``, any device; torch is
imported inside them). Computed in fp32, or in fp64 when given fp64 arrays.
"""

from __future__ import annotations

import math

import numpy as np


def token_valid(masks: np.ndarray | None, n_blocks: int, H_kv: int, bs: int) -> np.ndarray:
    """``[n_blocks, H_kv, bs]`` bool from ``[n_blocks, H_kv]`` uint64 token masks (None: all)."""
    if masks is None:
        return np.ones((n_blocks, H_kv, bs), dtype=bool)
    m = np.asarray(masks, dtype=np.uint64).reshape(n_blocks, H_kv)
    return ((m[:, :, None] >> np.arange(bs, dtype=np.uint64)) & np.uint64(1)).astype(bool)


def _groups(first: np.ndarray, last: np.ndarray, bs: int, valid: np.ndarray):
    """Items grouped by block count: (item ids, block ids [n, nb], token valid [n, H_kv, nb*bs])."""
    nbs = first[1:] - first[:-1]
    for nb in np.unique(nbs):
        ids = np.nonzero(nbs == nb)[0]
        if nb == 0:
            yield ids, None, None
            continue
        blocks = first[ids][:, None] + np.arange(nb)                         # [n, nb]
        ok = valid[blocks].copy()                                            # [n, nb, H_kv, bs]
        ok[:, -1] &= np.arange(bs) < last[ids][:, None, None]                # the last block's tokens
        yield ids, blocks, ok.transpose(0, 2, 1, 3).reshape(len(ids), ok.shape[2], nb * bs)


def attend_items(q, k, v, row, first, last, masks=None, scale: float | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """numpy: q ``[R, H, D]``, k / v ``[n_blocks, H_kv, bs, D]`` -> part_o ``[N, H, D]``,
    part_lse ``[N, H]`` (float32)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    ct = np.result_type(q.dtype, k.dtype, v.dtype, np.float32)
    row, first, last = (np.asarray(a, dtype=np.int64) for a in (row, first, last))
    nblk, H_kv, bs, D = k.shape
    H = q.shape[1]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    N = len(row)
    part_o = np.zeros((N, H, D), dtype=np.float32)
    part_lse = np.full((N, H), -np.inf, dtype=np.float32)
    valid = token_valid(masks, nblk, H_kv, bs)
    for ids, blocks, ok in _groups(first, last, bs, valid):
        if blocks is None:
            continue
        n, nb = blocks.shape
        kk = k[blocks].astype(ct).transpose(0, 2, 1, 3, 4).reshape(n, H_kv, nb * bs, D)
        vv = v[blocks].astype(ct).transpose(0, 2, 1, 3, 4).reshape(n, H_kv, nb * bs, D)
        qq = q[row[ids]].astype(ct).reshape(n, H_kv, G, D)
        s = np.matmul(qq, kk.transpose(0, 1, 3, 2)) * ct.type(scale)      # [n, H_kv, G, T]
        s = np.where(ok[:, :, None, :], s, -np.inf)
        m = s.max(-1, keepdims=True)
        live = m > -np.inf
        p = np.where(live, np.exp(s - np.where(live, m, 0)), 0)
        lsum = p.sum(-1, keepdims=True)
        o = np.matmul(p, vv) / np.where(live, lsum, 1)
        lse = np.where(live, m + np.log(np.where(live, lsum, 1)), -np.inf)
        part_o[ids] = o.reshape(n, H, D)
        part_lse[ids] = lse.reshape(n, H)
    return part_o, part_lse


def _merge_plan(row_first, order, n_parts: int):
    """(R, P, part ids [R, P], has [R, P]): row r's p-th part, and whether it has one."""
    row_first = np.asarray(row_first, dtype=np.int64)
    counts = row_first[1:] - row_first[:-1]
    P = int(counts.max()) if len(counts) else 0
    idx = np.arange(n_parts) if order is None else np.asarray(order, dtype=np.int64)
    has = np.arange(P) < counts[:, None]
    ids = idx[np.where(has, row_first[:-1, None] + np.arange(P), 0)] if P else np.zeros((len(counts), 0), np.int64)
    return len(counts), P, ids, has


def merge_parts(row_first, order, part_o, part_lse) -> tuple[np.ndarray, np.ndarray]:
    """numpy: -> out ``[R, H, D]``, lse ``[R, H]`` (float32); the parts of a row are added one
    after the other, in the given order (vectorised over rows)."""
    part_o, part_lse = np.asarray(part_o), np.asarray(part_lse)
    ct = np.result_type(part_o.dtype, np.float32)
    R, P, ids, has = _merge_plan(row_first, order, part_o.shape[0])
    H, D = part_o.shape[1:]
    ls = np.where(has[..., None], part_lse[ids], -np.inf).astype(ct)          # [R, P, H]
    M = ls.max(1) if P else np.full((R, H), -np.inf, ct)
    live = M > -np.inf
    Ms = np.where(live, M, 0)
    L = np.zeros((R, H), dtype=ct)
    acc = np.zeros((R, H, D), dtype=ct)
    for p in range(P):                                                        # fixed order
        take = ls[:, p] > -np.inf
        w = np.where(take, np.exp(np.where(take, ls[:, p], 0) - Ms), 0)
        L += w
        acc += w[..., None] * np.where(take[..., None], part_o[ids[:, p]], 0)
    out = np.where(live[..., None], acc / np.where(live, L, 1)[..., None], 0)
    lse = np.where(live, Ms + np.log(np.where(live, L, 1)), -np.inf)
    return out.astype(np.float32), lse.astype(np.float32)


def attend_items_torch(q, k, v, row, first, last, masks=None, scale: float | None = None):
    """torch (any device): q ``[R, H, D]``, k / v ``[n_blocks, H_kv, bs, D]`` tensors; row,
    first, last, masks as numpy arrays -> part_o ``[N, H, D]``, part_lse ``[N, H]`` (float32,
    on q's device)."""
    import torch

    row, first, last = (np.asarray(a, dtype=np.int64) for a in (row, first, last))
    nblk, H_kv, bs, D = k.shape
    H, dev = q.shape[1], q.device
    G = H // H_kv
    ct = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    N = len(row)
    part_o = torch.zeros(N, H, D, dtype=torch.float32, device=dev)
    part_lse = torch.full((N, H), float("-inf"), dtype=torch.float32, device=dev)
    valid = token_valid(masks, nblk, H_kv, bs)
    for ids, blocks, ok in _groups(first, last, bs, valid):
        if blocks is None:
            continue
        n, nb = blocks.shape
        bt = torch.from_numpy(blocks).to(dev)
        kk = k[bt].to(ct).transpose(1, 2).reshape(n, H_kv, nb * bs, D)
        vv = v[bt].to(ct).transpose(1, 2).reshape(n, H_kv, nb * bs, D)
        qq = q[torch.from_numpy(row[ids]).to(dev)].to(ct).reshape(n, H_kv, G, D)
        s = torch.matmul(qq, kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~torch.from_numpy(ok).to(dev)[:, :, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1)                                         # -inf where nothing
        p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
        it = torch.from_numpy(ids).to(dev)
        part_o[it] = torch.matmul(p, vv).reshape(n, H, D).float()
        part_lse[it] = lse.reshape(n, H).float()
    return part_o, part_lse


def merge_parts_torch(row_first, order, part_o, part_lse):
    """torch (any device): :func:`merge_parts` on tensors -> out ``[R, H, D]``, lse ``[R, H]``."""
    import torch

    R, P, ids, has = _merge_plan(row_first, order, part_o.shape[0])
    H, D = part_o.shape[1:]
    dev, ninf = part_o.device, float("-inf")
    ids, has = torch.from_numpy(ids).to(dev), torch.from_numpy(has).to(dev)
    ls = torch.where(has[..., None], part_lse[ids], ninf)                    # [R, P, H]
    M = ls.amax(1) if P else torch.full((R, H), ninf, device=dev)
    live = M > ninf
    Ms = torch.where(live, M, 0.0)
    L = torch.zeros(R, H, dtype=part_o.dtype, device=dev)
    acc = torch.zeros(R, H, D, dtype=part_o.dtype, device=dev)
    for p in range(P):                                                        # fixed order
        take = ls[:, p] > ninf
        w = torch.where(take, torch.exp(torch.where(take, ls[:, p], 0.0) - Ms), 0.0)
        L += w
        acc += w[..., None] * torch.where(take[..., None], part_o[ids[:, p]], 0.0)
    out = torch.where(live[..., None], acc / torch.where(live, L, 1.0)[..., None], 0.0)
    lse = torch.where(live, Ms + torch.log(torch.where(live, L, 1.0)), ninf)
    return out.float(), lse.float()
