"""Block geometry shared by every tier and worker (torch-free).

A *slot* holds one block — ``block_size`` tokens — for every KV head of one (sequence, layer):

    K of heads 0..H_kv-1, each channel-pair-major [D/2, block_size, 2]
        (channels 2i, 2i+1 of a token side by side: the scores of 16 tokens are D/2 vector ops,
        one VDPBF16PS each in bf16, and no horizontal sums)
    V of heads 0..H_kv-1, each token-major [block_size, D]

so each (layer, KV head) block is one contiguous run of ``block_size * D`` elements (16 x 128
x fp16 = 4 KiB, InstInfer's flash page) and K and V are stored separately. Slots on disk are
padded to a multiple of the page size so every read and write is page-aligned (O_DIRECT).
"""

from __future__ import annotations

from dataclasses import dataclass

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
PAGE = 4096


@dataclass(frozen=True)
class BlockLayout:
    """block_size: tokens per block; num_kv_heads, head_dim: the model's; dtype: KV dtype name."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

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

    def token_bytes(self, tokens: int) -> int:
        """K and V bytes of ``tokens`` tokens of one (sequence, layer), all heads."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize * tokens
