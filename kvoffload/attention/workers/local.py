"""In-process workers over a memory tier: the device's own blocks (plus the write-combining
tails, where decode appends the new token) and the host RAM tier.

Decode (one query per sequence) and a verify pass (L queries per sequence over blocks that all
precede them) run the native paged kernel on the CPU; otherwise the blocks are gathered and
attended by flash attention. The work
is done at ``collect()``, in the backend's thread, after the disk processes were sent theirs, so
it overlaps their reads (on CUDA the device's kernels run asynchronously too). Without the
native kernel (CUDA, or KVOFFLOAD_NO_KERNELS=1) the gather path serves decode too; tests
compare the two.
"""

from __future__ import annotations

import numpy as np
import torch

from kvoffload.attention.ops import attend_lse, attend_lse_masked
from kvoffload.attention.workers.protocol import (
    AttendRequest,
    AttendResult,
    WriteBlocks,
)
from kvoffload.kernels.paged import (
    MAX_QUERY_ROWS,
    BlockLists,
    PagedAttention,
    full_mask_row,
    masks_to_valid,
)
from kvoffload.kv.tiers.memory import MemoryTier

_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unpack_slots(slots: torch.Tensor, H_kv: int, D: int, bs: int, n_last: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, slot_elems]`` -> K, V ``[H_kv, T, D]`` (T = n*bs, or fewer when the last block
    holds ``n_last`` tokens)."""
    n = slots.shape[0]
    half = H_kv * D * bs
    k = slots[:, :half].reshape(n, H_kv, D // 2, bs, 2).permute(1, 0, 3, 2, 4).reshape(H_kv, n * bs, D)
    v = slots[:, half:].reshape(n, H_kv, bs, D).permute(1, 0, 2, 3).reshape(H_kv, n * bs, D)
    if n_last is not None and n_last < bs:
        T = (n - 1) * bs + n_last
        k, v = k[:, :T], v[:, :T]
    return k, v


def pack_slots(k: torch.Tensor, v: torch.Tensor, bs: int) -> torch.Tensor:
    """K, V ``[H_kv, n*bs, D]`` -> ``[n, slot_elems]`` in the slot layout (kv/layout.py)."""
    H_kv, T, D = k.shape
    n = T // bs
    kp = k.reshape(H_kv, n, bs, D // 2, 2).permute(1, 0, 3, 2, 4).reshape(n, -1)   # [n, H_kv*(D/2)*bs*2]
    vp = v.reshape(H_kv, n, bs, D).permute(1, 0, 2, 3).reshape(n, -1)     # [n, H_kv*bs*D] token-major
    return torch.cat([kp, vp], dim=1)


class MemoryWorker:
    """Attends over the blocks of one memory tier; ``tails``: the tier of write-combining
    buffers, for the worker that holds them (the device)."""

    def __init__(self, tier: MemoryTier, threads: int, tails: MemoryTier | None = None,
                 native: bool = True) -> None:
        self.tier, self.tails, self.threads = tier, tails, threads
        lay = tier.layout
        self.H_kv, self.D, self.bs = lay.num_kv_heads, lay.head_dim, lay.block_size
        self.kernel = native and tier.device.type == "cpu"     # turned off if unavailable
        self._kernels: dict[int, PagedAttention] = {}
        self._job: AttendRequest | None = None

    def _paged(self, G: int) -> PagedAttention | None:
        if not self.kernel:
            return None
        if G not in self._kernels:
            lay = self.tier.layout
            if not PagedAttention.available(lay.dtype, G, lay.head_dim, lay.block_size):
                self.kernel = None
                return None
            self._kernels[G] = PagedAttention(lay.dtype, lay.num_kv_heads, G, lay.head_dim, lay.block_size)
        return self._kernels[G]

    # ---- the Worker protocol ----
    def submit(self, req: AttendRequest) -> None:
        self._job = req                      # computed at collect(), in the caller's thread

    def collect(self) -> AttendResult:
        job, self._job = self._job, None
        return self.attend(job)

    def write(self, w: WriteBlocks) -> None:
        raise NotImplementedError("memory tiers are written in place by the backend")

    def close(self) -> None:
        pass

    # ---- compute ----
    def attend(self, req: AttendRequest) -> AttendResult:
        q = req.q                                                      # [B, L, H, D]
        B, L, H, D = q.shape
        kernel = self._paged(H // self.H_kv) if L == 1 or (req.k_new is None and L <= MAX_QUERY_ROWS) else None
        if kernel is not None:
            return self._decode_native(kernel, req)
        if req.k_new is not None:
            self._append_torch(req)
        o = torch.zeros(B, L, H, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, L, H), float("-inf"), device=q.device)
        read = 0
        for b in range(B):
            k, v, n = self._keys(req, b)
            if n == 0:
                continue
            if req.masks is None:
                ob, lb = attend_lse(q[b].transpose(0, 1), k, v)       # [H, L, D], [H, L]
            else:
                ob, lb = attend_lse_masked(q[b].transpose(0, 1), k, v, self._valid(req, b, n).to(k.device))
            o[b], lse[b] = ob.transpose(0, 1), lb.transpose(0, 1)
            read += self.tier.layout.token_bytes(n)
        return self._result(req, o, lse, read)

    @staticmethod
    def _result(req: AttendRequest, o: torch.Tensor, lse: torch.Tensor, read: int) -> AttendResult:
        sent = req.q.numel() * req.q.element_size()
        if req.k_new is not None:
            sent += 2 * req.k_new.numel() * req.k_new.element_size()
        return AttendResult(o, lse, read, sent, (o.numel() + lse.numel()) * 4)

    def _tail(self, req: AttendRequest, b: int) -> tuple[int, int]:
        """(tail slot, tokens in it) of sequence b; (-1, 0) when this worker holds no tail."""
        if req.tail_slots is None:
            return -1, 0
        n = int(req.tail_lens[b]) + (1 if req.k_new is not None else 0)
        return int(req.tail_slots[b]), n

    def _keys(self, req: AttendRequest, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        blocks = np.asarray(req.blocks[b], dtype=np.int64)
        slot, n_tail = self._tail(req, b)
        parts = [self.tier.gather(blocks)] if len(blocks) else []
        if n_tail:
            parts.append(self.tails.view(slot)[None])
        if not parts:
            return None, None, 0
        slots = torch.cat(parts) if len(parts) > 1 else parts[0]
        k, v = unpack_slots(slots, self.H_kv, self.D, self.bs, n_tail if n_tail else None)
        return k, v, k.shape[1]

    def _valid(self, req: AttendRequest, b: int, n: int) -> torch.Tensor:
        """``[H_kv, n]`` bool: the tokens sequence b's heads attend (masked blocks, then the tail)."""
        valid = np.ones((self.H_kv, n), bool)
        m = np.asarray(req.masks[b], dtype=np.uint64).reshape(-1, self.H_kv)
        valid[:, :len(m) * self.bs] = masks_to_valid(m, self.bs)
        return torch.from_numpy(valid)

    def _append_torch(self, req: AttendRequest) -> None:
        half = self.H_kv * self.D * self.bs
        for b in range(len(req.seq_ids)):
            view = self.tails.view(int(req.tail_slots[b]))
            t = int(req.tail_lens[b])
            view[:half].view(self.H_kv, self.D // 2, self.bs, 2)[:, :, t] = req.k_new[b].view(self.H_kv, self.D // 2, 2)
            view[half:].view(self.H_kv, self.bs, self.D)[:, t] = req.v_new[b]

    def _decode_native(self, kernel: PagedAttention, req: AttendRequest) -> AttendResult:
        """The paged kernel: one query per sequence (decode, which appends its new k/v to the
        tail first), or L queries per sequence over keys that all precede them (a verify pass
        over the committed KV: each query row is a kernel row over the same block list)."""
        B, L, H, D = req.q.shape
        q = req.q.reshape(B * L, H, D).float()                         # [B*L, H, D] fp32
        addrs = self.tier.addrs
        per_seq, last, read = [], [], 0
        masks = [] if req.masks is not None else None
        lay = self.tier.layout
        for b in range(B):
            a = addrs[np.asarray(req.blocks[b], dtype=np.int64)]
            slot, n_tail = self._tail(req, b)
            if masks is None:
                read += lay.token_bytes(len(a) * self.bs)
            else:                                   # a head's rows of a block are read if it is chosen
                m = np.asarray(req.masks[b], dtype=np.uint64).reshape(-1, self.H_kv)
                read += int(np.count_nonzero(m)) * lay.token_bytes(self.bs) // self.H_kv
                masks += [np.concatenate([m, full_mask_row(self.bs, self.H_kv)]) if n_tail else m] * L
            if n_tail:
                a = np.append(a, self.tails.addrs[slot])
                read += lay.token_bytes(n_tail)
            per_seq += [a] * L
            last += [n_tail if n_tail else self.bs] * L
        out = torch.empty(B * L, 1, H, D)
        lse = torch.empty(B * L, 1, H)
        append = None
        if req.k_new is not None:
            k, v = req.k_new, req.v_new                                # [B, H_kv, D]
            append = (k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                      self.tails.addrs[np.asarray(req.tail_slots, dtype=np.int64)],
                      np.asarray(req.tail_lens, dtype=np.int64))
        if q.stride(-1) != 1 or q.stride(-2) != D:
            q = q.contiguous()
        kernel(B * L, q.data_ptr(), q.stride(0), BlockLists.build(per_seq, last, masks), out.data_ptr(), lse.data_ptr(),
               self.threads, append)
        return self._result(req, out.view(B, L, H, D), lse.view(B, L, H), read)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAME[dtype]
