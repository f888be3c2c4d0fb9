"""Block geometry and the one slot transform, shared by every tier, worker and backend (torch-free
at import: disk worker processes use it on numpy arrays; the transforms take numpy arrays or
torch tensors alike).

A *slot* holds one block — ``block_size`` tokens — for every KV head of one (sequence, layer):

    K of heads 0..H_kv-1, each channel-pair-major [D/2, block_size, 2]
        (channels 2i, 2i+1 of a token side by side: the scores of 16 tokens are D/2 vector ops,
        one VDPBF16PS each in bf16, and no horizontal sums)
    V of heads 0..H_kv-1, each token-major [block_size, D]

so each (layer, KV head) block is one contiguous run of ``block_size * D`` elements (16 x 128
x fp16 = 4 KiB, InstInfer's flash page) and K and V are stored separately. Slots on disk are
padded to a multiple of the page size so every read and write is page-aligned (O_DIRECT).

A *chunk* is ``chunk_blocks`` consecutive blocks of one (sequence, layer). It is the unit of
placement (a chunk's blocks live in one tier, in consecutive slots: one read on disk) and the
fixed boundary of partial attention: each chunk's partial output is computed alone and the
partials are merged in chunk order, so the output does not depend on which tier holds what.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvoffload.dtypes import DTYPES

PAGE = 4096


def _permute(x, *axes):
    """``x.permute(*axes)`` for a torch tensor, ``x.transpose(axes)`` for a numpy array."""
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


@dataclass(frozen=True)
class BlockLayout:
    """block_size: tokens per block; num_kv_heads, head_dim: the model's; dtype: KV dtype name;
    chunk_blocks: blocks per chunk."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_blocks: int = 16

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def head_elems(self) -> int:
        """Elements of one head's K (or V) block."""
        return self.block_size * self.head_dim

    @property
    def slot_elems(self) -> int:
        return 2 * self.num_kv_heads * self.head_elems

    @property
    def slot_bytes(self) -> int:
        return self.slot_elems * self.itemsize

    @property
    def disk_stride(self) -> int:
        """Bytes between consecutive slots in a disk file (page-aligned)."""
        return -(-self.slot_bytes // PAGE) * PAGE

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_blocks * self.block_size

    def token_bytes(self, tokens: int) -> int:
        """K and V bytes of ``tokens`` tokens of one (sequence, layer), all heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize * tokens

    # ---- the slot transform ----
    def pack(self, k, v):
        """K, V ``[H_kv, n*bs, D]`` -> ``[n, slot_elems]`` slots."""
        H_kv, T, D = k.shape
        bs = self.block_size
        n = T // bs
        kp = _permute(k.reshape(H_kv, n, bs, D // 2, 2), 1, 0, 3, 2, 4).reshape(n, -1)   # [n, H_kv*(D/2)*bs*2]
        vp = _permute(v.reshape(H_kv, n, bs, D), 1, 0, 2, 3).reshape(n, -1)              # [n, H_kv*bs*D]
        if hasattr(kp, "permute"):
            import torch

            return torch.cat([kp, vp], dim=1)
        import numpy as np

        return np.concatenate([kp, vp], axis=1)

    def unpack_blocks(self, slots):
        """``[n, slot_elems]`` -> K, V ``[n, H_kv, bs, D]`` (per block, token-major)."""
        n = slots.shape[0]
        H_kv, D, bs = self.num_kv_heads, self.head_dim, self.block_size
        half = H_kv * D * bs
        k = _permute(slots[:, :half].reshape(n, H_kv, D // 2, bs, 2), 0, 1, 3, 2, 4).reshape(n, H_kv, bs, D)
        v = slots[:, half:].reshape(n, H_kv, bs, D)
        return k, v

    def unpack(self, slots, tokens: int | None = None):
        """``[n, slot_elems]`` -> K, V ``[H_kv, T, D]``: T = n*bs, or the first ``tokens`` of them."""
        n = slots.shape[0]
        k, v = self.unpack_blocks(slots)                                                  # [n, H_kv, bs, D]
        T = n * self.block_size
        k = _permute(k, 1, 0, 2, 3).reshape(self.num_kv_heads, T, self.head_dim)
        v = _permute(v, 1, 0, 2, 3).reshape(self.num_kv_heads, T, self.head_dim)
        if tokens is not None and tokens < T:
            k, v = k[:, :tokens], v[:, :tokens]
        return k, v

    def views(self, slot):
        """One slot ``[slot_elems]`` -> its K ``[H_kv, D/2, bs, 2]`` and V ``[H_kv, bs, D]`` views."""
        H_kv, D, bs = self.num_kv_heads, self.head_dim, self.block_size
        half = H_kv * D * bs
        return slot[:half].reshape(H_kv, D // 2, bs, 2), slot[half:].reshape(H_kv, bs, D)

    def write_tokens(self, slot, col: int, k, v) -> None:
        """Write k, v ``[H_kv, n, D]`` into one slot's token columns ``col .. col+n-1``."""
        H_kv, n, D = k.shape
        kv, vv = self.views(slot)
        kv[:, :, col:col + n] = _permute(k.reshape(H_kv, n, D // 2, 2), 0, 2, 1, 3)
        vv[:, col:col + n] = v

    def write_range(self, slots, start: int, k, v) -> None:
        """Write k, v ``[H_kv, L, D]`` as tokens ``start .. start+L-1`` of consecutive slots
        ``slots`` ``[n, slot_elems]`` (token t in slot t // bs)."""
        bs, L = self.block_size, k.shape[1]
        pos, t = 0, start % bs
        if t:
            n = min(bs - t, L)
            self.write_tokens(slots[start // bs], t, k[:, :n], v[:, :n])
            pos = n
        full = (L - pos) // bs
        if full:
            b0 = (start + pos) // bs
            slots[b0:b0 + full] = self.pack(k[:, pos:pos + full * bs], v[:, pos:pos + full * bs])
            pos += full * bs
        if pos < L:
            self.write_tokens(slots[(start + pos) // bs], 0, k[:, pos:], v[:, pos:])

    def chunk_runs(self, blocks):
        """Sorted block indices -> (first ``[N+1]``, chunk ``[N]``): run i holds
        ``blocks[first[i]:first[i+1]]``, all of chunk ``chunk[i]`` (numpy int64)."""
        import numpy as np

        blocks = np.asarray(blocks, np.int64)
        if len(blocks) == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int64)
        c = blocks // self.chunk_blocks
        brk = np.flatnonzero(np.diff(c)) + 1
        first = np.concatenate([[0], brk, [len(blocks)]]).astype(np.int64)
        return first, c[first[:-1]]
