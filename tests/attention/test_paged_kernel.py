"""The native paged kernel (kernels/paged_attn.c through kernels/paged.py): items against the
reference (kernels/reference.py) for every dtype and specialised / generic shapes, token masks,
append, the merge, and the bit-identity contract (an item's partial depends only on its own
inputs; every merge goes through one function, in the order given)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvoffload.dtypes import DTYPES, torch_dtype
from kvoffload.kernels import reference as ref
from kvoffload.kernels.paged import Append, Items, Merge, PagedAttention, merge_parts
from kvoffload.kv.layout import BlockLayout

TOL = {"float32": 2e-5, "bfloat16": 1e-4, "float16": 2e-5}        # vs an fp64 reference
SHAPES = [(3, 3, 64, 16), (2, 7, 64, 16), (1, 8, 128, 16), (1, 5, 32, 32), (1, 2, 128, 16), (2, 2, 8, 4), (2, 2, 16, 4)]   # H_kv, G, D, bs


def kernel(dtype: str, H_kv: int, G: int, D: int, bs: int) -> PagedAttention:
    if not PagedAttention.available(dtype, G, D, bs, H_kv):
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    return PagedAttention(dtype, H_kv, G, D, bs)


class Arena:
    """n slots of random KV in one tensor; ``addr[i]``: slot i's address."""

    def __init__(self, dtype: str, n: int, H_kv: int, D: int, bs: int, seed: int, offset: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.H_kv, self.D, self.bs = H_kv, D, bs
        self.elems = 2 * H_kv * D * bs
        data = torch.randn(n, self.elems, generator=g).to(torch_dtype(dtype))
        # room for `offset` extra elements in front: the same slots at another alignment
        self.buf = torch.zeros(n * self.elems + offset, dtype=torch_dtype(dtype))
        self.slots = self.buf[offset:].view(n, self.elems)
        self.slots.copy_(data)
        self.addr = self.slots.data_ptr() + np.arange(n, dtype=np.int64) * self.elems * self.slots.element_size()

    def index(self, ptrs: np.ndarray) -> np.ndarray:
        return (np.asarray(ptrs) - self.addr[0]) // (self.elems * self.slots.element_size())

    def kv64(self) -> tuple[np.ndarray, np.ndarray]:
        """K, V ``[n, H_kv, bs, D]`` fp64, as the kernel sees them."""
        return BlockLayout(self.bs, self.H_kv, self.D, "float32").unpack_blocks(self.slots.float().numpy().astype(np.float64))


def run(kern: PagedAttention, q, items: Items, threads: int = 2, **kw) -> tuple[np.ndarray, np.ndarray]:
    po = np.full((items.n, kern.H, kern.D), np.nan, np.float32)
    pl = np.full((items.n, kern.H), np.nan, np.float32)
    kern(q, items, po, pl, threads, **kw)
    return po, pl


def reference(arena: Arena, q: np.ndarray, items: Items) -> tuple[np.ndarray, np.ndarray]:
    k, v = arena.kv64()
    b = arena.index(items.ptrs)
    return ref.attend_items(q.astype(np.float64), k[b], v[b], items.row, items.first, items.last, items.masks)


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


def close(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), fin), f"{name}: -inf / finite pattern differs"
    assert np.array_equal(got[~fin], want[~fin])
    d = np.abs(got[fin] - want[fin]) if fin.any() else np.zeros(1)
    print(f"  {name}: max diff {d.max():.2e}, mean {d.mean():.2e}")
    assert d.max() < tol, (name, d.max())


def ragged_items(arena: Arena, bs: int, L: int = 2) -> tuple[Items, np.ndarray]:
    """Three sequences cut into chunks of 4 blocks plus tails, L query rows per sequence (a
    verify pass: the rows of a sequence share its blocks), plus an item with no blocks."""
    seqs = [(arena.addr[0:13], 12 * bs + max(1, bs - 3)), (arena.addr[13:14], 1), (arena.addr[14:24], 10 * bs)]
    rows, ptrs, ntok = [], [], []
    for s, (p, t) in enumerate(seqs):
        for j in range(L):
            rows.append(s * L + j)
            ptrs.append(p)
            ntok.append(t)
    items, row_first = Items.chunked(rows, ptrs, ntok, bs, chunk_blocks=4)
    empty = Items(np.r_[items.row, 0], np.r_[items.first, items.first[-1]], np.r_[items.last, bs], items.ptrs)
    return empty, row_first                              # the empty item is no row's part


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H_kv,G,D,bs", SHAPES)
def test_items_and_merge_match_reference(dtype, H_kv, G, D, bs):
    kern = kernel(dtype, H_kv, G, D, bs)
    arena = Arena(dtype, 24, H_kv, D, bs, seed=0)
    items, row_first = ragged_items(arena, bs)
    R, H = 6, H_kv * G
    q = torch.randn(R, H, D, generator=torch.Generator().manual_seed(1)).numpy()     # general fp32 queries
    out, lse = np.empty((R, H, D), np.float32), np.empty((R, H), np.float32)
    po, pl = run(kern, q, items, merge=Merge(row_first, None, out, lse))
    ro, rl = reference(arena, q, items)
    assert (po[-1] == 0).all() and np.isneginf(pl[-1]).all()          # the item with no blocks
    print(f"\n{dtype} H_kv={H_kv} G={G} D={D} bs={bs}")
    close("part_o", po, ro, TOL[dtype])
    close("part_lse", pl, rl, TOL[dtype])
    mo, ml = ref.merge_parts(row_first, None, ro, rl)
    close("merged o", out, mo, TOL[dtype])
    close("merged lse", lse, ml, TOL[dtype])
    # the merge of the chunks is attention over the whole sequence (one item per row)
    whole = Items.build(range(R), [items.ptrs[items.first[row_first[r]]:items.first[row_first[r + 1]]] for r in range(R)],
                        [items.last[row_first[r + 1] - 1] for r in range(R)])
    wo, wl = reference(arena, q, whole)
    close("merged vs whole-sequence o", out, wo, TOL[dtype])
    close("merged vs whole-sequence lse", lse, wl, TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H_kv,G,D,bs", [(3, 3, 64, 16), (2, 7, 64, 16), (2, 2, 16, 4), (1, 2, 32, 64)])
def test_token_masks(dtype, H_kv, G, D, bs):
    """Per (block, head) token masks; 0 = the head skips the block (its rows are not read:
    NaN there changes nothing), and a head that attends nothing gets o = 0, lse = -inf."""
    kern = kernel(dtype, H_kv, G, D, bs)
    n, H = 12, H_kv * G
    arena = Arena(dtype, n, H_kv, D, bs, seed=2)
    rng = np.random.default_rng(3)
    full = np.uint64((1 << bs) - 1)
    masks = rng.integers(0, 1 << 62, size=(n, H_kv), dtype=np.int64).astype(np.uint64) & full
    masks &= rng.integers(0, 2, size=(n, H_kv)).astype(np.uint64) * np.uint64((1 << 64) - 1)   # some heads skip
    masks[0] = full
    masks[9:12, 0] = 0                                       # item 2: head 0 attends nothing
    half = H_kv * D * bs
    for j, h in zip(*np.nonzero(masks == 0)):                # skipped blocks: poison K and V of the head
        arena.slots[j, h * D * bs:(h + 1) * D * bs] = float("nan")
        arena.slots[j, half + h * D * bs:half + (h + 1) * D * bs] = float("nan")
    items = Items(row=[0, 1, 0], first=[0, 5, 9, 12], last=[bs, max(1, bs - 2), bs],
                  ptrs=arena.addr[np.r_[0:5, 5:9, 9:12]], masks=masks)
    q = torch.randn(2, H, D, generator=torch.Generator().manual_seed(4)).numpy()
    po, pl = run(kern, q, items)
    clean = Arena(dtype, n, H_kv, D, bs, seed=2)             # the same KV, unpoisoned, for the reference
    ro, rl = reference(clean, q, Items(items.row, items.first, items.last, clean.addr[arena.index(items.ptrs)], masks))
    print(f"\n{dtype} H_kv={H_kv} G={G} D={D} bs={bs}")
    assert np.isinf(pl[2, :G]).all() and (po[2, :G] == 0).all()
    close("part_o", po, ro, TOL[dtype])
    close("part_lse", pl, rl, TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H_kv,G,D,bs", [(2, 3, 64, 16), (2, 2, 8, 4)])
def test_append_into_tail_then_attend(dtype, H_kv, G, D, bs):
    """The new token's k/v go into the tail slot (K channel-pair-major, V token-major) before
    the items are computed; columns past last_len are never read (NaN there is harmless)."""
    kern = kernel(dtype, H_kv, G, D, bs)
    H, T = H_kv * G, min(6, bs)                              # T tokens in the tail after the append
    arena = Arena(dtype, 4, H_kv, D, bs, seed=5)
    arena.slots[3] = float("nan")                            # the tail slot: garbage until written
    g = torch.Generator().manual_seed(7)
    k_new = torch.randn(T, H_kv, D, generator=g).to(torch_dtype(dtype))
    v_new = torch.randn(T, H_kv, D, generator=g).to(torch_dtype(dtype))
    slot = np.full(T, arena.addr[3], np.int64)
    q = torch.randn(1, H, D, generator=g).numpy()
    # the earlier tokens through an append-only call (no items) ...
    kern(q, Items.build([], [], []), np.empty((0, H, D), np.float32), np.empty((0, H), np.float32), 1,
         append=Append(k_new[:T - 1], v_new[:T - 1], slot[:T - 1], np.arange(T - 1)))
    # ... the new one with the attention: bf16 k/v as torch tensors (no .numpy() for bf16), others as numpy
    kn, vn = (k_new[T - 1:], v_new[T - 1:]) if dtype == "bfloat16" else (k_new[T - 1:].numpy(), v_new[T - 1:].numpy())
    items = Items.build([0, 0], [arena.addr[0:3], arena.addr[3:4]], [bs, T])
    out, lse = np.empty((1, H, D), np.float32), np.empty((1, H), np.float32)
    run(kern, q, items, append=Append(kn, vn, slot[T - 1:], [T - 1]), merge=Merge([0, 2], None, out, lse))
    k, v = BlockLayout(bs, H_kv, D, "float32").unpack_blocks(arena.slots.float().numpy().astype(np.float64))
    assert np.array_equal(k[3, :, :T].transpose(1, 0, 2), k_new.double().numpy())
    assert np.array_equal(v[3, :, :T].transpose(1, 0, 2), v_new.double().numpy())
    k[3, :, T:] = v[3, :, T:] = 0                            # never read; finite for the reference
    mo, ml = ref.merge_parts([0, 2], None, *ref.attend_items(q.astype(np.float64), k, v, items.row, items.first, items.last))
    close("merged o", out, mo, TOL[dtype])
    close("merged lse", lse, ml, TOL[dtype])


def test_bf16_kv_with_fp32_queries_keeps_query_precision():
    """An fp32 query over bf16 KV is scored with its bf16 remainder too: close to fp32 math."""
    H_kv, G, D, bs = 2, 3, 64, 16
    kern = kernel("bfloat16", H_kv, G, D, bs)
    arena = Arena("bfloat16", 8, H_kv, D, bs, seed=8)
    items = Items.build([0], [arena.addr], [bs])
    q = (torch.randn(1, H_kv * G, D, generator=torch.Generator().manual_seed(9)) * 3).numpy()   # not bf16-exact
    _, pl = run(kern, q, items, threads=1)
    _, l_ref = reference(arena, q, items)
    _, l_bf = reference(arena, torch.from_numpy(q).bfloat16().float().numpy(), items)
    err, err_bf = np.abs(pl - l_ref).max(), np.abs(l_bf - l_ref).max()
    assert err < 2e-4 and err < err_bf / 10, (err, err_bf)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H_kv,G,D,bs", [(3, 3, 64, 16), (2, 7, 64, 16), (2, 2, 8, 4)])
def test_item_partials_are_bit_identical_however_computed(dtype, H_kv, G, D, bs):
    """An item's partial depends only on its inputs: alone, among many other items, with 1 or 2
    threads, at another position, from a copy of its slots at another address, with its q row
    in another buffer -- the same bits."""
    kern = kernel(dtype, H_kv, G, D, bs)
    H = H_kv * G
    arena = Arena(dtype, 64, H_kv, D, bs, seed=10)
    rng = np.random.default_rng(11)
    q = torch.randn(8, H, D, generator=torch.Generator().manual_seed(12)).numpy()
    mine = (3, arena.addr[[5, 9, 2, 40, 41, 7, 7]], max(1, bs - 5))          # row, blocks (any order), last
    alone = run(kern, q, Items.build([mine[0]], [mine[1]], [mine[2]]), threads=1)
    others = [(int(rng.integers(8)), arena.addr[rng.integers(0, 64, int(rng.integers(1, 20)))], int(rng.integers(1, bs + 1)))
              for _ in range(40)]
    for pos in (0, 17, 40):
        lst = others[:pos] + [mine] + others[pos:]
        for threads in (1, 2):
            po, pl = run(kern, q, Items.build(*zip(*lst)), threads=threads)
            assert np.array_equal(bits(po[pos]), bits(alone[0][0])) and np.array_equal(bits(pl[pos]), bits(alone[1][0]))
    # the same slots copied elsewhere (another alignment), the q row alone in a strided buffer
    moved = Arena(dtype, 64, H_kv, D, bs, seed=10, offset=3 if dtype == "float32" else 5)
    qbuf = np.zeros((2, 2 * H * D + 7), np.float32)
    qv = qbuf[:, 7:7 + H * D].reshape(2, H, D)
    qv[1] = q[mine[0]]
    po, pl = run(kern, qv, Items.build([1], [moved.addr[arena.index(mine[1])]], [mine[2]]), threads=2)
    assert np.array_equal(bits(po[0]), bits(alone[0][0])) and np.array_equal(bits(pl[0]), bits(alone[1][0]))


def test_partials_ignore_the_callers_floating_point_mode():
    """The kernel fixes its own FP mode (denormals flushed): the caller's thread flushing
    denormals or not (torch.set_flush_denormal) changes no bit. The data makes denormals: the
    top-scoring token has v = 0, the others score ~95 lower (weight ~1e-38) with v = 1e-3."""
    H_kv, G, D, bs = 1, 1, 64, 16
    kern = kernel("float32", H_kv, G, D, bs)
    arena = Arena("float32", 1, H_kv, D, bs, seed=18)
    k = torch.zeros(bs, D)
    k[0, 0] = 1.0                                             # q . k = 0 for t > 0, 95 * 8 / 8 for t = 0
    v = torch.full((bs, D), 1e-3)
    v[0] = 0.0
    half = D * bs
    arena.slots[0, :half] = k.view(bs, D // 2, 2).transpose(0, 1).reshape(-1)
    arena.slots[0, half:] = v.reshape(-1)
    q = np.zeros((1, 1, D), np.float32)
    q[0, 0, 0] = 95.0 * 8                                     # scale = 1/8
    items = Items.build([0], [arena.addr], [bs])
    got = []
    for flush in (False, True, False):
        torch.set_flush_denormal(flush)
        try:
            got.append(run(kern, q, items, threads=1))
        finally:
            torch.set_flush_denormal(False)
    for po, pl in got[1:]:
        assert np.array_equal(bits(po), bits(got[0][0])) and np.array_equal(bits(pl), bits(got[0][1]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_merge_is_one_function_in_the_given_order(dtype):
    """The merge inside the attention call == the standalone merge of the same parts; parts
    computed by two calls (two tiers) and merged == one call; a row's output does not depend on
    the other rows, the thread count, or where its parts are stored (order)."""
    H_kv, G, D, bs = 3, 3, 64, 16
    kern = kernel(dtype, H_kv, G, D, bs)
    H = H_kv * G
    arena = Arena(dtype, 80, H_kv, D, bs, seed=13)
    q = torch.randn(3, H, D, generator=torch.Generator().manual_seed(14)).numpy()
    ptrs = [arena.addr[0:37], arena.addr[37:70], arena.addr[70:80]]
    items, row_first = Items.chunked(range(3), ptrs, [37 * bs - 4, 33 * bs, 9 * bs + 1], bs, chunk_blocks=8)
    out, lse = np.empty((3, H, D), np.float32), np.empty((3, H), np.float32)
    po, pl = run(kern, q, items, merge=Merge(row_first, None, out, lse))
    o2, l2 = np.empty_like(out), np.empty_like(lse)
    merge_parts(row_first, None, po, pl, o2, l2, threads=1)
    assert np.array_equal(bits(out), bits(o2)) and np.array_equal(bits(lse), bits(l2))
    # two tiers: the even items in one call, the odd ones in another; parts stored tier by tier
    even, odd = np.arange(0, items.n, 2), np.arange(1, items.n, 2)
    sub = lambda ix: Items.build(items.row[ix], [items.ptrs[items.first[i]:items.first[i + 1]] for i in ix], items.last[ix])
    pa, la = run(kern, q, sub(even), threads=1)
    pb, lb = run(kern, q, sub(odd), threads=2)
    stored = np.concatenate([even, odd])                     # stored[s] = the item held at position s
    order = np.argsort(stored)                               # merge order: chunk order, as one call
    o3, l3 = np.empty_like(out), np.empty_like(lse)
    merge_parts(row_first, order, np.concatenate([pa, pb]), np.concatenate([la, lb]), o3, l3, threads=2)
    assert np.array_equal(bits(out), bits(o3)) and np.array_equal(bits(lse), bits(l3))
    # row 1 merged alone, from its own parts only
    o4, l4 = np.empty((1, H, D), np.float32), np.empty((1, H), np.float32)
    merge_parts([0, row_first[2] - row_first[1]], None, po[row_first[1]:row_first[2]], pl[row_first[1]:row_first[2]], o4, l4)
    assert np.array_equal(bits(out[1]), bits(o4[0])) and np.array_equal(bits(lse[1]), bits(l4[0]))


def test_merge_skips_empty_parts():
    """lse = -inf parts contribute nothing (even with NaN in o); no parts, or only empty ones:
    out = 0, lse = -inf. Native, numpy and torch references agree."""
    if not PagedAttention.available("float32", 1, 16, 16):
        pytest.skip("no native kernel")
    H, D = 3, 16
    rng = np.random.default_rng(15)
    po = rng.standard_normal((6, H, D)).astype(np.float32)
    pl = rng.standard_normal((6, H)).astype(np.float32)
    pl[1] = -np.inf
    po[1] = np.nan
    pl[3, 0] = -np.inf
    po[3, 0] = np.nan
    pl[4:] = -np.inf
    row_first = [0, 3, 3, 4, 6]                              # rows: {0,1,2}, {}, {3}, {4,5} (all empty)
    out, lse = np.empty((4, H, D), np.float32), np.empty((4, H), np.float32)
    merge_parts(row_first, None, po, pl, out, lse, threads=2)
    assert np.isfinite(out).all()
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all()
    assert (out[3] == 0).all() and np.isneginf(lse[3]).all()
    assert (out[2, 0] == 0).all() and np.isneginf(lse[2, 0]) and np.isfinite(lse[2, 1:]).all()
    w = np.exp(pl[[0, 2]] - np.maximum(pl[0], pl[2]))
    np.testing.assert_allclose(out[0], (w[..., None] * po[[0, 2]]).sum(0) / w.sum(0)[..., None], rtol=1e-5, atol=1e-6)
    ro, rl = ref.merge_parts(row_first, None, po, pl)
    to, tl = ref.merge_parts_torch(row_first, None, torch.from_numpy(po), torch.from_numpy(pl))
    for o, l in ((ro, rl), (to.numpy(), tl.numpy())):
        np.testing.assert_allclose(out, o, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, l, rtol=1e-5, atol=1e-6)


def test_torch_reference_matches_numpy():
    H_kv, G, D, bs = 2, 3, 16, 4
    rng = np.random.default_rng(16)
    k, v = rng.standard_normal((2, 10, H_kv, bs, D)).astype(np.float32)
    q = rng.standard_normal((3, H_kv * G, D)).astype(np.float32)
    masks = rng.integers(0, 16, size=(10, H_kv)).astype(np.uint64)
    args = ([0, 2, 1, 2], [0, 4, 5, 5, 10], [3, 1, 4, 2], masks)     # one item with no blocks
    o, l = ref.attend_items(q, k, v, *args)
    to, tl = ref.attend_items_torch(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), *args)
    np.testing.assert_allclose(to.numpy(), o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tl.numpy(), l, rtol=1e-5, atol=1e-6)
    assert np.isneginf(l[2]).all() and (o[2] == 0).all()
    order = [3, 0, 2, 1]
    mo, ml = ref.merge_parts([0, 2, 4], order, o, l)
    tmo, tml = ref.merge_parts_torch([0, 2, 4], order, to, tl)
    np.testing.assert_allclose(tmo.numpy(), mo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tml.numpy(), ml, rtol=1e-5, atol=1e-6)


def test_chunked_cut():
    p = np.arange(100, 120, dtype=np.int64)
    items, row_first = Items.chunked([5, 6], [p, p[:3]], [16 * 7 + 3, 32], 16, chunk_blocks=3)
    # row 5: blocks 0-2, 3-5, 6 (full), tail block 7 with 3 tokens; row 6: blocks 0-1 (full)
    assert row_first.tolist() == [0, 4, 5]
    assert items.row.tolist() == [5, 5, 5, 5, 6]
    assert items.first.tolist() == [0, 3, 6, 7, 8, 10]
    assert items.last.tolist() == [16, 16, 16, 3, 16]
    assert items.ptrs.tolist() == [*range(100, 108), 100, 101]


def test_rejects_bad_arguments():
    kern = kernel("float32", 1, 2, 16, 4)
    arena = Arena("float32", 2, 1, 16, 4, seed=17)
    q = np.zeros((1, 2, 16), np.float32)
    po, pl = np.empty((1, 2, 16), np.float32), np.empty((1, 2), np.float32)
    for last in (0, 5):
        with pytest.raises(ValueError):
            kern(q, Items.build([0], [arena.addr], [last]), po, pl, 1)
    with pytest.raises(ValueError):                          # q row out of range
        kern(q, Items.build([1], [arena.addr], [4]), po, pl, 1)
    with pytest.raises(ValueError):                          # merge order outside this call's parts
        kern(q, Items.build([0], [arena.addr], [4]), po, pl, 1,
             merge=Merge([0, 1], [1], np.empty((1, 2, 16), np.float32), np.empty((1, 2), np.float32)))
    with pytest.raises(TypeError):
        kern(q.astype(np.float64), Items.build([0], [arena.addr], [4]), po, pl, 1)
    big = kernel("float32", 1, 2, 16, 128)
    with pytest.raises(ValueError):                          # token masks need bs <= 64
        big(q, Items.build([0], [arena.addr[:1]], [4], [np.ones((1, 1), np.uint64)]), po, pl, 1)


@pytest.mark.parametrize("src,dst", [(a, b) for a in DTYPES for b in DTYPES if a != b])
def test_kv_conversions_round_as_torch_does(src, dst):
    """paged_attn.c's kvo_cvt_<from>_<to> (what a hook does to new k/v of another dtype than the
    KV's: kernels/hook.py's KVConvert) give torch's ``.to()`` bits: random values over many
    magnitudes, exact ties, fp16 subnormals and the edge of fp16's range, infinities, zeros."""
    import ctypes

    from kvoffload.dtypes import DTYPES
    from kvoffload.kernels.build import load

    lib = load("paged_attn")
    if lib is None:
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-30, 20, (4096,), generator=g))
    # fp16's subnormal ties and range edge, bf16 / fp16 halfway points, signed zeros, infinities
    edges = [0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, 1.5 * 2.0 ** -24, 2.0 ** -14, 2.0 ** -14 * (1 - 2 ** -11),
             65504.0, 65519.0, 65520.0, 1e6, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
             float("inf"), float("-inf"), 1e-40, -3e-39]
    x = torch.cat([x, torch.tensor(edges, dtype=torch.float64), -torch.tensor(edges, dtype=torch.float64)])
    x = x.to(torch_dtype(src)).reshape(-1, 8)                                        # [M, 8] of the source dtype
    M, n = x.shape[0], 6                                                    # rows of 6 at a stride of 8
    want = x[:, :n].to(torch_dtype(dst))
    got = torch.empty(M, n, dtype=torch_dtype(dst))
    fn = getattr(lib, f"kvo_cvt_{DTYPES[src].kernel}_{DTYPES[dst].kernel}")
    fn.restype = None
    fn(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(8), ctypes.c_int(M), ctypes.c_int(n), ctypes.c_void_p(got.data_ptr()))
    bits = torch.int32 if dst == "float32" else torch.int16
    diff = (got.view(bits) != want.view(bits)).sum()
    print(f"{src} -> {dst}: {M * n} values, {int(diff)} differ in bits")
    assert diff == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_probe_reads_every_float(threads):
    """``kvo_read_sum`` (what `bench attention` / `bench offload` time as the memory peak)
    visits every float of the buffer once: its sum is the buffer's (whole 4096-float pages)."""
    from kvoffload.kernels.paged import read_bandwidth_probe

    probe = read_bandwidth_probe()
    if probe is None:
        pytest.skip("no native kernels")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 8, 64 * 4096).astype(np.float32))
    assert probe(x.data_ptr(), x.numel(), threads) == pytest.approx(float(x.double().sum()), rel=1e-6)
