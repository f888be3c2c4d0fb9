"""The native paged kernel over compressed blocks (``int8`` / ``int4``, kv/layout.py) against the
PyTorch / numpy reference (the blocks dequantised by ``BlockLayout.unpack_blocks``, attention in
fp64): generic shapes, value groups, token masks; and the bit-identity contract (an item's
partial is the same alone or among others, at any thread count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvoffload.dtypes import QUANT
from kvoffload.kernels import reference as ref
from kvoffload.kernels.paged import Append, Items, PagedAttention
from kvoffload.kv.layout import BlockLayout

SHAPES = [(3, 3, 64, 16, 0), (2, 7, 64, 16, 32), (1, 5, 32, 32, 8), (2, 2, 16, 4, 0), (2, 4, 128, 16, 64),
          (1, 2, 64, 128, 0), (1, 9, 48, 16, 16)]  # H_kv, G, D, bs, group (AVX-512 path: bs, D, group % 16 == 0)
TOL = 3e-5                       # vs fp64 over the same dequantised values (the scales fold in fp32)


class QuantArena:
    """n compressed slots of random KV (keys with an outlier channel) in one numpy buffer."""

    def __init__(self, lay: BlockLayout, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(lay.num_kv_heads, n * lay.block_size, lay.head_dim, generator=g)
        k[:, :, 1] *= 8
        v = torch.randn(lay.num_kv_heads, n * lay.block_size, lay.head_dim, generator=g)
        self.lay, self.slots = lay, lay.pack(k, v).numpy().copy()               # [n, slot_bytes] uint8
        self.addr = self.slots.ctypes.data + np.arange(n, dtype=np.int64) * lay.slot_bytes

    def reference(self, q: np.ndarray, items: Items):
        k, v = self.lay.unpack_blocks(self.slots)                               # [n, H_kv, bs, D] fp32
        b = (items.ptrs - self.addr[0]) // self.lay.slot_bytes
        return ref.attend_items(q.astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64),
                                items.row, items.first, items.last, items.masks)


def kernel_unavailable() -> bool:
    return not PagedAttention.available("int8", 1, 64, 16)


def kernel(lay: BlockLayout, G: int) -> PagedAttention:
    kern = PagedAttention.for_layout(lay, G)
    if kern is None:
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    return kern


def run(kern: PagedAttention, q, items: Items, threads: int = 2):
    po = np.full((items.n, kern.H, kern.D), np.nan, np.float32)
    pl = np.full((items.n, kern.H), np.nan, np.float32)
    kern(q, items, po, pl, threads)
    return po, pl


def check_against_reference(stored, shape, masked, lib=None, label=""):
    H_kv, G, D, bs, group = shape
    lay = BlockLayout(bs, H_kv, D, stored, 4, group)
    kern = kernel(lay, G) if lib is None else PagedAttention.for_layout(lay, G, lib=lib)
    arena = QuantArena(lay, 12, seed=bs + D)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, H_kv * G, D)).astype(np.float32)
    ptrs = [arena.addr[[0, 1, 2, 3]], arena.addr[[5, 4]], arena.addr[[7]], arena.addr[8:12]]
    masks = None
    if masked:
        full = (1 << bs) - 1
        masks = [rng.integers(0, full + 1, size=(len(p), H_kv), dtype=np.uint64) for p in ptrs]
        masks[1][0, 0] = 0                                                    # a head skips a block
    items = Items.build([0, 1, 2, 0], ptrs, [bs, bs, max(1, bs - 3), bs], masks)
    po, pl = run(kern, q, items)
    ro, rl = arena.reference(q, items)
    live = np.isfinite(rl)
    do, dl = np.abs(po - ro), np.abs(pl[live] - rl[live])
    print(f"{label}{stored} {shape} {'masked' if masked else 'dense'}: o max {do.max():.2e} mean {do.mean():.2e}, "
          f"lse max {dl.max():.2e}")
    assert np.array_equal(np.isfinite(pl), live)
    assert do.max() < TOL and dl.max() < TOL


@pytest.mark.parametrize("stored", list(QUANT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_native_equals_reference(stored, shape, masked):
    if masked and shape[3] > 64:
        pytest.skip("masks need bs <= 64")
    check_against_reference(stored, shape, masked)


# Builds of the kernel for the other ISAs' bodies of this CPU's compiler: AVX-512 without VBMI (the
# compressed codes widened by conversion, not by the byte shuffles) and AVX2 (8 lanes); a flag this
# CPU already lacks gives the same body as the cached build, and a CPU without AVX-512 tests its own.
ISA_VARIANTS = {"avx512-no-vbmi": ("-mno-avx512vbmi",), "avx2": ("-mno-avx512f",)}


@pytest.fixture(scope="module")
def isa_builds(tmp_path_factory):
    """paged_attn.c built per ISA_VARIANTS, two compilers at once (each takes ~40-60 s)."""
    from concurrent.futures import ThreadPoolExecutor

    from kvoffload.kernels import build

    if kernel_unavailable():
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    d = tmp_path_factory.mktemp("isa")

    def one(item):
        name, flags = item
        try:
            return name, build.compile_variant("paged_attn", build.SOURCES["paged_attn"], d / f"{name}.so", flags)
        except RuntimeError as e:
            return name, e

    with ThreadPoolExecutor(len(ISA_VARIANTS)) as ex:
        return dict(ex.map(one, ISA_VARIANTS.items()))


@pytest.mark.parametrize("isa", list(ISA_VARIANTS))
@pytest.mark.parametrize("stored", list(QUANT))
def test_other_isa_bodies_equal_reference(isa, stored, isa_builds):
    lib = isa_builds[isa]
    if isinstance(lib, Exception):
        pytest.skip(f"cannot build the {isa} path: {str(lib)[:200]}")
    for shape in SHAPES:
        for masked in (False, True):
            if not (masked and shape[3] > 64):
                check_against_reference(stored, shape, masked, lib=lib, label=f"{isa}: ")


@pytest.mark.parametrize("stored", list(QUANT))
def test_partial_bit_identical_alone_and_among_others(stored):
    lay = BlockLayout(16, 3, 64, stored, 4)
    kern = kernel(lay, 3)
    arena = QuantArena(lay, 16, seed=3)
    q = np.random.default_rng(2).standard_normal((2, 9, 64)).astype(np.float32)
    ptrs = [arena.addr[0:4], arena.addr[4:9], arena.addr[9:16]]
    many = Items.build([0, 1, 0], ptrs, [16, 16, 16])
    po, pl = run(kern, q, many, threads=2)
    for i in range(3):
        one = Items.build([0], [ptrs[i]], [16])
        qi = q[[many.row[i]]]
        o1, l1 = run(kern, qi, one, threads=1)
        assert np.array_equal(o1[0], po[i]) and np.array_equal(l1[0], pl[i])


def test_no_append_into_compressed_blocks():
    lay = BlockLayout(16, 1, 32, "int8", 4)
    kern = kernel(lay, 1)
    arena = QuantArena(lay, 1, seed=0)
    k = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(ValueError, match="written whole"):
        kern(np.zeros((1, 1, 32), np.float32), Items.build([0], [arena.addr], [16]), np.zeros((1, 1, 32), np.float32),
             np.zeros((1, 1), np.float32), 1, append=Append(k, k, arena.addr[:1], np.zeros(1, np.int64)))
