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
padded to a multiple of :data:`DIRECT_ALIGN` (512 bytes) so every read and write is aligned for
O_DIRECT; a chunk of 16 slots then starts on a page; the store's files pad to whole pages.

A *compressed* block (``dtype`` ``int8`` / ``int4``, kvoffload/dtypes.py's ``QUANT``; FlexGen's
group-wise KV, KIVI's per-channel keys) is one contiguous run of bytes holding its codes and the
scales and minima that decode them (x = code * scale + min, fp32 arithmetic; scale, min fp16):

    K codes of heads 0..H_kv-1, each channel-major [D, bs] (one group per channel over the
        block's tokens: keys have outlier channels); int4: [D, bs/2] bytes, token 2j in the low
        nibble, 2j+1 in the high one
    V codes of heads 0..H_kv-1, each token-major [bs, D] (groups of ``group`` channels of a
        token); int4: [bs, D/2] bytes, channel 2j low, 2j+1 high
    K scales and minima: fp16 [H_kv, 2, D] (row 0 the scales, row 1 the minima)
    V scales and minima: fp16 [H_kv, bs, D/group, 2]

so a compressed block is still one read. The native kernels (paged_attn.c) read this layout
(offsets from :meth:`BlockLayout.quant_offsets`) and dequantise in registers; ``unpack_blocks``
is their reference. A sequence's partly filled last block (the write-combining tail) stays in
full precision (:meth:`BlockLayout.full`) until it is full.

A *chunk* is ``chunk_blocks`` consecutive blocks of one (sequence, layer). It is the unit of
placement (a chunk's blocks live in one tier, in consecutive slots: one read on disk) and the
fixed boundary of partial attention: each chunk's partial output is computed alone and the
partials are merged in chunk order, so the output does not depend on which tier holds what.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvoffload.dtypes import DTYPES, QUANT
from kvoffload.errors import ConfigError

PAGE = 4096
# A disk tier's slots are O_DIRECT reads and writes: their offsets and lengths must be multiples
# of the filesystem's direct-I/O alignment, the device's logical block (512 bytes on most disks;
# a 4 KiB-sector device needs PAGE, and its shards then fall back to buffered I/O:
# kv/tiers/disk_worker.py DiskShard). Slots padded to this, not to whole pages, keep a compressed
# block's saving on disk (SmolLM2's int8 slot: 7104 bytes -> 7168, not 8192).
DIRECT_ALIGN = 512


def torch_stack(a, b):
    """``torch.stack([a, b], -1)`` (torch imported only when a tensor is met)."""
    import torch

    return torch.stack([a, b], -1)


def _permute(x, *axes):
    """``x.permute(*axes)`` for a torch tensor, ``x.transpose(axes)`` for a numpy array."""
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


@dataclass(frozen=True)
class BlockLayout:
    """block_size: tokens per block; num_kv_heads, head_dim: the model's; dtype: KV dtype name
    (a full-precision dtype, or a compressed format: ``int8``, ``int4``); chunk_blocks: blocks
    per chunk; group: channels per value group of a compressed block (0 = the whole head)."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_blocks: int = 16
    group: int = 0

    @classmethod
    def for_kv(cls, kv, num_kv_heads: int, head_dim: int, dtype: str) -> BlockLayout:
        """The layout of a model's KV blocks under ``kv`` (a config.KVConfig) in ``dtype`` (a
        ``--kv-dtype`` name): the one place the geometry is assembled."""
        return cls(kv.block_size, num_kv_heads, head_dim, dtype, kv.chunk_blocks,
                   kv.kv_group_size if dtype in QUANT else 0)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype not in QUANT:
            raise ConfigError(f"unknown KV dtype {self.dtype!r}")
        if self.quant is None:
            return
        g, D, bs = self.vgroup, self.head_dim, self.block_size
        if g < 1 or D % g:
            raise ConfigError(f"--kv-group-size {self.group} must divide the head dimension ({D}) for --kv-dtype {self.dtype}")
        if self.quant.bits == 4 and (bs % 2 or g % 2):
            raise ConfigError(f"--kv-dtype int4 packs two codes a byte: the block size ({bs}) and --kv-group-size "
                              f"({g}) must be even")

    @property
    def quant(self):
        """The compressed format (dtypes.QuantDType), or None for a full-precision layout."""
        return QUANT.get(self.dtype)

    @property
    def vgroup(self) -> int:
        """Channels per value group of a compressed block."""
        return self.group or self.head_dim

    def full(self, dtype: str) -> BlockLayout:
        """The same geometry in full precision ``dtype`` (a compressed layout's tails)."""
        return self if dtype == self.dtype else BlockLayout(self.block_size, self.num_kv_heads, self.head_dim, dtype,
                                                            self.chunk_blocks)

    @property
    def storage(self) -> type:
        """The numpy dtype a slot's elements are held in (a compressed block: bytes)."""
        return np.uint8 if self.quant else DTYPES[self.dtype].storage

    @property
    def itemsize(self) -> int:
        return 1 if self.quant else DTYPES[self.dtype].itemsize

    def quant_offsets(self) -> tuple[int, int, int, int]:
        """A compressed slot's byte offsets: (V codes, K scales/minima, V scales/minima, end),
        the K codes at 0; each part holds heads 0..H_kv-1 back to back."""
        H, D, bs = self.num_kv_heads, self.head_dim, self.block_size
        codes = D * bs * self.quant.bits // 8                     # one head's K (or V) codes
        v0 = H * codes
        km = 2 * v0
        vm = km + H * 2 * D * 2
        return v0, km, vm, vm + H * bs * (D // self.vgroup) * 2 * 2

    @property
    def head_elems(self) -> int:
        """Elements of one head's K (or V) block."""
        return self.block_size * self.head_dim

    @property
    def slot_elems(self) -> int:
        """Elements of one slot (of :attr:`storage`; a compressed block: its bytes)."""
        if self.quant:
            return self.quant_offsets()[3]
        return 2 * self.num_kv_heads * self.head_elems

    @property
    def slot_bytes(self) -> int:
        return self.slot_elems * self.itemsize

    @property
    def disk_stride(self) -> int:
        """Bytes between consecutive slots in a disk tier's file (:data:`DIRECT_ALIGN`-aligned; a
        chunk of a multiple of 8 blocks then starts on a page)."""
        return -(-self.slot_bytes // DIRECT_ALIGN) * DIRECT_ALIGN

    @property
    def page_stride(self) -> int:
        """Bytes between a store file's slots (kv/persist/store.py: whole pages, its format)."""
        return -(-self.slot_bytes // PAGE) * PAGE

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_blocks * self.block_size

    def token_bytes(self, tokens: int) -> int:
        """K and V bytes of ``tokens`` tokens of one (sequence, layer), all heads (a compressed
        layout: their share of whole blocks, scales included)."""
        return self.slot_bytes * tokens // self.block_size

    # ---- the slot transform ----
    def pack(self, k, v):
        """K, V ``[H_kv, n*bs, D]`` -> ``[n, slot_elems]`` slots (a compressed layout: quantised,
        torch tensors only)."""
        if self.quant:
            return self._quantise(k, v)
        H_kv, T, D = k.shape
        bs = self.block_size
        n = T // bs
        kp = _permute(k.reshape(H_kv, n, bs, D // 2, 2), 1, 0, 3, 2, 4).reshape(n, -1)   # [n, H_kv*(D/2)*bs*2]
        vp = _permute(v.reshape(H_kv, n, bs, D), 1, 0, 2, 3).reshape(n, -1)              # [n, H_kv*bs*D]
        if hasattr(kp, "permute"):
            import torch

            return torch.cat([kp, vp], dim=1)
        return np.concatenate([kp, vp], axis=1)

    def unpack_blocks(self, slots):
        """``[n, slot_elems]`` -> K, V ``[n, H_kv, bs, D]`` (per block, token-major; a
        compressed layout: dequantised, float32)."""
        if self.quant:
            return self._dequantise(slots)
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

    def unpack_f32(self, slots):
        """numpy ``[n, slot_elems]`` of :attr:`storage` -> K, V ``[n, H_kv, bs, D]`` float32."""
        if self.quant:
            return self._dequantise(slots)
        from kvoffload.dtypes import to_float32

        return self.unpack_blocks(to_float32(slots, self.dtype))

    # ---- compressed blocks (the kernels' reference) ----
    def _quantise(self, k, v):
        """K, V ``[H_kv, n*bs, D]`` (torch) -> ``[n, slot_bytes]`` uint8 compressed slots."""
        import torch

        H, T, D = k.shape
        bs, g = self.block_size, self.vgroup
        n, qmax, bits = T // bs, (1 << self.quant.bits) - 1, self.quant.bits

        def quant(x):                                                    # groups along the last dim
            mn, mx = x.amin(-1), x.amax(-1)
            scale = ((mx - mn) / qmax).half()
            lo = mn.half()
            s32, m32 = scale.float()[..., None], lo.float()[..., None]
            inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
            codes = ((x - m32) * inv).round_().clamp_(0, qmax).to(torch.uint8)
            return codes, scale, lo

        kk = k.float().reshape(H, n, bs, D).permute(1, 0, 3, 2)                         # [n, H, D, bs]
        kc, ks, km = quant(kk)                                                          # [n, H, D, bs], [n, H, D]
        vv = v.float().reshape(H, n, bs, D // g, g).permute(1, 0, 2, 3, 4)               # [n, H, bs, D/g, g]
        vc, vs, vm = quant(vv)
        vc = vc.reshape(n, H, bs, D)
        if bits == 4:
            kc = kc[..., 0::2] | (kc[..., 1::2] << 4)                                   # [n, H, D, bs/2]
            vc = vc[..., 0::2] | (vc[..., 1::2] << 4)                                   # [n, H, bs, D/2]
        kmeta = torch.stack([ks, km], dim=2).contiguous().view(torch.uint8)             # [n, H, 2, 2D]
        vmeta = torch.stack([vs, vm], dim=-1).contiguous().view(torch.uint8)            # [n, H, bs, D/g, 4]
        return torch.cat([kc.reshape(n, -1), vc.reshape(n, -1), kmeta.reshape(n, -1), vmeta.reshape(n, -1)], 1)

    def _dequantise(self, slots):
        """``[n, slot_bytes]`` uint8 (numpy or torch) -> K, V ``[n, H_kv, bs, D]`` float32."""
        H, D, bs, g = self.num_kv_heads, self.head_dim, self.block_size, self.vgroup
        n = slots.shape[0]
        v0, km, vm, end = self.quant_offsets()
        torch_in = hasattr(slots, "permute")

        def f32(x):
            return x.float() if torch_in else x.astype(np.float32)

        def f16(x):                                   # bytes -> their fp16 values, as float32
            if torch_in:
                import torch

                return x.contiguous().view(torch.float16).float()
            return np.ascontiguousarray(x).view(np.float16).astype(np.float32)

        def codes(x, rows, cols):                     # [n, H, rows, cols] codes (int4: cols paired in bytes)
            if self.quant.bits == 8:
                return f32(x.reshape(n, H, rows, cols))
            x = x.reshape(n, H, rows, cols // 2)
            lo, hi = x & 15, x >> 4
            pair = torch_stack(lo, hi) if torch_in else np.stack([lo, hi], -1)
            return f32(pair.reshape(n, H, rows, cols))

        kmeta = f16(slots[:, km:vm]).reshape(n, H, 2, D)
        vmeta = f16(slots[:, vm:end]).reshape(n, H, bs, D // g, 2)
        k = codes(slots[:, :v0], D, bs) * kmeta[:, :, 0, :, None] + kmeta[:, :, 1, :, None]        # [n, H, D, bs]
        v = codes(slots[:, v0:km], bs, D).reshape(n, H, bs, D // g, g) * vmeta[..., 0:1] + vmeta[..., 1:2]
        return _permute(k, 0, 1, 3, 2), v.reshape(n, H, bs, D)

    def views(self, slot):
        """One slot ``[slot_elems]`` -> its K ``[H_kv, D/2, bs, 2]`` and V ``[H_kv, bs, D]`` views
        (full-precision layouts: a compressed block is written whole, by :meth:`pack`)."""
        if self.quant:
            raise ValueError("a compressed KV block is written whole (pack), never token by token")
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
        blocks = np.asarray(blocks, np.int64)
        if len(blocks) == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int64)
        c = blocks // self.chunk_blocks
        brk = np.flatnonzero(np.diff(c)) + 1
        first = np.concatenate([[0], brk, [len(blocks)]]).astype(np.int64)
        return first, c[first[:-1]]
