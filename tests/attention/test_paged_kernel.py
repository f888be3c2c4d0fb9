"""The native paged kernel (every dtype, specialised and generic shapes) against PyTorch math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvoffload.attention.workers.local import unpack_slots
from kvoffload.kernels.paged import BlockLists, PagedAttention

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reference(q, slots, last, H_kv, D, bs):
    """q [H, D] fp32 over the slots (last block holds `last` tokens) -> o [H, D], lse [H]."""
    k, v = unpack_slots(slots.float(), H_kv, D, bs, last)
    G = q.shape[0] // H_kv
    s = torch.einsum("hgd,htd->hgt", q.float().view(H_kv, G, D), k) / D ** 0.5
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hgt,htd->hgd", torch.softmax(s, -1), v).reshape(-1, D), lse.reshape(-1)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("H_kv,G,D,bs", [(3, 3, 64, 16), (2, 7, 64, 16), (1, 5, 32, 32), (2, 2, 8, 4), (2, 2, 16, 4)])
def test_paged_kernel_matches_torch(dtype, H_kv, G, D, bs):
    if not PagedAttention.available(dtype, G, D, bs):
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    torch.manual_seed(0)
    td = DT[dtype]
    kern = PagedAttention(dtype, H_kv, G, D, bs)
    nblocks = [7, 1, 0, 40]                 # ragged; one sequence with no blocks here
    last = [max(1, bs - 3), bs, bs, min(3, bs)]          # tokens in each last block (<= bs)
    arena = torch.randn(sum(nblocks) + 1, 2 * H_kv * D * bs).to(td)
    perm = torch.randperm(sum(nblocks)).numpy()          # blocks scattered over the arena
    addrs = arena.data_ptr() + perm.astype(np.int64) * arena.stride(0) * arena.element_size()
    per_seq, at = [], 0
    for n in nblocks:
        per_seq.append(addrs[at:at + n])
        at += n
    B, H = len(nblocks), H_kv * G
    q = torch.randn(B, H, D).to(td).float()          # fp32 queries holding KV-dtype values
    out, lse = torch.empty(B, H, D), torch.empty(B, H)
    kern(B, q.data_ptr(), q.stride(0), BlockLists.build(per_seq, last), out.data_ptr(), lse.data_ptr(), 2)
    at = 0
    for b, n in enumerate(nblocks):
        if n == 0:
            assert torch.isinf(lse[b]).all() and (out[b] == 0).all()
            continue
        o_ref, l_ref = reference(q[b], arena[torch.from_numpy(perm[at:at + n])], last[b], H_kv, D, bs)
        at += n
        tol = 2e-5 if dtype == "float32" else 2e-3
        assert (out[b] - o_ref).abs().max().item() < tol
        assert (lse[b] - l_ref).abs().max().item() < tol


def test_paged_kernel_appends_into_tail():
    H_kv, G, D, bs = 2, 3, 64, 16
    kern = PagedAttention("float32", H_kv, G, D, bs)
    torch.manual_seed(1)
    slots = torch.randn(3, 2 * H_kv * D * bs)
    addrs = slots.data_ptr() + np.arange(3, dtype=np.int64) * slots.stride(0) * 4
    k_new, v_new = torch.randn(1, H_kv, D), torch.randn(1, H_kv, D)
    q = torch.randn(1, H_kv * G, D)
    out, lse = torch.empty(1, H_kv * G, D), torch.empty(1, H_kv * G)
    # the tail (slot 2) holds 6 tokens; the new one goes to column 6
    kern(1, q.data_ptr(), q.stride(0), BlockLists.build([addrs], [7]), out.data_ptr(), lse.data_ptr(), 1,
         (k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(), v_new.stride(0), addrs[2:3], np.array([6])))
    k, v = unpack_slots(slots[2:3], H_kv, D, bs)
    assert torch.equal(k[:, 6], k_new[0]) and torch.equal(v[:, 6], v_new[0])
    o_ref, l_ref = reference(q[0], slots, 7, H_kv, D, bs)
    assert (out[0] - o_ref).abs().max().item() < 2e-5


def test_bf16_kv_with_fp32_queries_keeps_query_precision():
    """An fp32 query over bf16 KV is scored with its bf16 remainder too: close to fp32 math."""
    H_kv, G, D, bs = 2, 3, 64, 16
    kern = PagedAttention("bfloat16", H_kv, G, D, bs)
    torch.manual_seed(2)
    slots = torch.randn(8, 2 * H_kv * D * bs).to(torch.bfloat16)
    addrs = slots.data_ptr() + np.arange(8, dtype=np.int64) * slots.stride(0) * 2
    q = torch.randn(1, H_kv * G, D) * 3                       # not bf16-representable
    out, lse = torch.empty(1, H_kv * G, D), torch.empty(1, H_kv * G)
    kern(1, q.data_ptr(), q.stride(0), BlockLists.build([addrs], [bs]), out.data_ptr(), lse.data_ptr(), 1)
    _, l_ref = reference(q[0], slots, bs, H_kv, D, bs)
    _, l_bf = reference(q[0].to(torch.bfloat16).float(), slots, bs, H_kv, D, bs)
    err, err_bf = (lse[0] - l_ref).abs().max().item(), (l_bf - l_ref).abs().max().item()
    assert err < 2e-4 and err < err_bf / 10, (err, err_bf)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("H_kv,G,D,bs", [(3, 3, 64, 16), (2, 2, 16, 4), (1, 2, 32, 64)])
def test_paged_kernel_token_masks(dtype, H_kv, G, D, bs):
    """Sparse decode: per (block, head) token masks, 0 = the head skips the block; against the
    masked softmax in PyTorch."""
    from kvoffload.attention.ops import attend_lse_masked
    from kvoffload.kernels.paged import masks_to_valid

    if not PagedAttention.available(dtype, G, D, bs):
        pytest.skip("no native kernel (no compiler or KVOFFLOAD_NO_KERNELS=1)")
    torch.manual_seed(4)
    td = DT[dtype]
    kern = PagedAttention(dtype, H_kv, G, D, bs)
    n, last = 9, max(1, bs - 1)
    arena = torch.randn(n, 2 * H_kv * D * bs).to(td)
    addrs = arena.data_ptr() + np.arange(n, dtype=np.int64) * arena.stride(0) * arena.element_size()
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 1 << 62, size=(n, H_kv), dtype=np.int64).astype(np.uint64) & np.uint64((1 << bs) - 1)
    masks &= rng.integers(0, 2, size=(n, H_kv)).astype(np.uint64) * np.uint64((1 << 64) - 1)   # some heads skip
    masks[0] = np.uint64((1 << bs) - 1)                  # every head sees something
    q = torch.randn(1, H_kv * G, D).to(td).float()
    out, lse = torch.empty(1, H_kv * G, D), torch.empty(1, H_kv * G)
    kern(1, q.data_ptr(), q.stride(0), BlockLists.build([addrs], [last], [masks]), out.data_ptr(), lse.data_ptr(), 2)
    k, v = unpack_slots(arena.float(), H_kv, D, bs, last)
    valid = torch.from_numpy(masks_to_valid(masks, bs))[:, :k.shape[1]]
    o_ref, l_ref = attend_lse_masked(q[0][:, None], k, v, valid)
    tol = 2e-5 if dtype == "float32" else 2e-3
    assert (out[0] - o_ref[:, 0]).abs().max().item() < tol
    assert (lse[0] - l_ref[:, 0]).abs().max().item() < tol
