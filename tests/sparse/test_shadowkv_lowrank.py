"""ShadowKV's low-rank keys (shadowkv_lowrank): the factors' error against the SVD's bound, the
split of the selection (exact / rebuilt), the rebuilt attention against one softmax over the
same keys, and the policy end to end (offloaded = in memory is in test_policies.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvoffload.api import LLM
from kvoffload.config import SparseConfig
from kvoffload.sparse import make_policy
from kvoffload.sparse.base import softmax_scale

H_KV, G, D, BS = 2, 2, 16, 16


class Model:
    num_kv_heads, head_dim, num_heads, num_layers = H_KV, D, H_KV * G, 1
    rope_theta, rope_scaling = 10000.0, None


def policy(rank: int | None, budget: str = "1/4", **kw):
    cfg = SparseConfig(sparse_policy="shadowkv_lowrank", sparse_budget=budget, sparse_dense_layers="none",
                       sparse_rank=rank, **kw)
    return make_policy(cfg, Model, BS, torch.device("cpu"))


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x ``[H, T, D]`` rotated as the model does (model/rope.py)."""
    from kvoffload.config import ModelConfig  # noqa: F401  (the tables need only theta / scaling)
    from kvoffload.model.rope import apply_rope, inverse_frequencies

    inv = inverse_frequencies(D, Model.rope_theta, None).float()
    f = torch.outer(pos.float(), inv)
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([-f.sin(), f.sin()], -1)
    return apply_rope(x.transpose(0, 1)[None], (cos[None, :, None], sin[None, :, None]))[0].transpose(0, 1)


def low_rank_keys(T: int, true_rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(post-RoPE keys ``[H_kv, T, D]``, their pre-RoPE ``[T, H_kv*D]``): a rank-``true_rank``
    signal plus small noise, as real pre-RoPE keys are (ShadowKV's observation)."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(T, true_rank, generator=g) @ torch.randn(true_rank, H_KV * D, generator=g)
    pre += 0.05 * torch.randn(T, H_KV * D, generator=g)
    k = rope(pre.reshape(T, H_KV, D).transpose(0, 1), torch.arange(T))
    return k, pre


def prefill(pol, k: torch.Tensor, T: int) -> None:
    pol.allocate(0, T + 8)
    for a in range(0, T, 64):                                      # prefill chunks
        pol.append(0, 0, a, k[:, a:a + 64], k[:, a:a + 64])


@pytest.mark.parametrize("rank", [4, 8, 12])
def test_factors_error_is_the_svd_bound(rank):
    """Rank r keeps the best rank-r approximation of the pre-RoPE keys (Eckart-Young: the error's
    Frobenius norm is that of the dropped singular values), and RoPE at use adds no error (a
    rotation); at full rank the keys come back up to fp32 rounding."""
    T = 300
    k, pre = low_rank_keys(T, 8)
    S = torch.linalg.svdvals(pre.double())
    for r, want in ((rank, float(S[rank:].square().sum().sqrt())), (H_KV * D, 0.0)):
        pol = policy(r)
        prefill(pol, k, T)
        st = pol.states[0][0]
        pol.factor(st, T)
        got = torch.stack([pol.keys(st, h, torch.arange(T)) for h in range(H_KV)])   # [H_kv, T, D]
        err = float((got - k).double().square().sum().sqrt())
        rel = (got - k).abs().max() / k.abs().max()
        print(f"rank {r}: |K - K_r|_F {err:.4e} (SVD bound {want:.4e}), max relative {rel:.1e}")
        assert abs(err - want) <= 1e-4 * float(S.square().sum().sqrt()) + 1e-3 * want
        assert st.coef.shape == (T, min(r, H_KV * D)) and st.raw == []            # the exact keys are gone
    held, exact = pol.factor_bytes()
    assert exact == T * H_KV * D * 4


def test_split_covers_shadowkv_selection_and_keeps_outliers_exact():
    """The exact and rebuilt parts are disjoint and together ShadowKV's selection; sinks, the
    recent window, the outlier chunks and tokens after the factorisation are never rebuilt."""
    T = 700
    k, _ = low_rank_keys(T, 6, seed=1)
    pol, ref = policy(6), make_policy(SparseConfig(sparse_policy="shadowkv", sparse_budget="1/4",
                                                   sparse_dense_layers="none"), Model, BS, torch.device("cpu"))
    prefill(pol, k, T - 20)
    prefill(ref, k, T - 20)
    g = torch.Generator().manual_seed(2)
    for s in range(T - 20, T):                                     # decode steps past the factorisation
        q = torch.randn(1, H_KV * G, D, generator=g)
        kn = k[:, s][None]
        a = pol.select_batch(0, (0,), q, (s,), kn, kn)
        b = ref.select_batch(0, (0,), q, (s,), kn, kn)
        ex, work = pol.split_rebuilt(0, (0,), (s,), a)
        st = pol.states[0][0]
        assert st.T0 == T - 20
        want = np.asarray(b[0].union(BS)[1]), b[0].union(BS)[0]
        eb, em = ex[0].union(BS)
        tokens = {}
        for blocks, masks in [(eb, em)] + ([(w[2], w[3]) for w in work] if work else []):
            for i, blk in enumerate(blocks):
                for h in range(H_KV):
                    m = int(masks[i, h])
                    assert tokens.get((blk, h), 0) & m == 0                      # disjoint
                    tokens[(blk, h)] = tokens.get((blk, h), 0) | m
        assert {key: m for key, m in tokens.items() if m} == {
            (blk, h): int(want[0][i, h]) for i, blk in enumerate(want[1]) for h in range(H_KV) if want[0][i, h]}
        if work:
            _, lo, hi, _ = pol.geometry(s + 1)
            per = BS // pol.unit
            out = pol.outliers(st, lo * per, hi * per, s + 1).numpy() + lo * per
            for _, _, blocks, masks in work:
                assert ((blocks >= lo) & (blocks < hi)).all() and ((blocks + 1) * BS <= st.T0).all()
                for h in range(H_KV):
                    for c in out[h]:
                        i = np.searchsorted(blocks, c // per)
                        if i < len(blocks) and blocks[i] == c // per:
                            assert int(masks[i, h]) >> int((c % per) * pol.unit) & 0xFF == 0
        assert ex[0].read_blocks() == b[0].read_blocks() and ex[0].chosen_tokens(BS) == b[0].chosen_tokens(BS)
    assert pol.lowrank.v_only > 0


def test_rebuilt_attention_equals_one_softmax():
    """The exact part (here in PyTorch) merged with attend_rebuilt's part equals one softmax over
    every chosen token, the rebuilt ones with their rebuilt keys."""
    T = 500
    k, _ = low_rank_keys(T, 6, seed=3)
    v = torch.randn(H_KV, T + 1, D)
    pol = policy(5)
    prefill(pol, k, T)
    q = torch.randn(1, H_KV * G, D)
    sel = pol.select_batch(0, (0,), q, (T,), k[:, -1][None], v[:, T][None])
    ex, work = pol.split_rebuilt(0, (0,), (T,), sel)
    assert work
    st, scale = pol.states[0][0], softmax_scale(D)
    e_idx, e_valid = ex[0].token_index(T + 1, BS)                  # exact tokens (+ the tail)
    kfull = torch.cat([k, k[:, -1:]], 1)                           # the decode token's key
    o_e, l_e = torch.zeros(H_KV * G, D), torch.zeros(H_KV * G)
    o_ref = torch.zeros(H_KV * G, D)
    _, _, blocks, masks = work[0]
    from kvoffload.kernels.paged import masks_to_valid

    rvalid = masks_to_valid(masks, BS)
    rtoks = (blocks[:, None] * BS + np.arange(BS)).reshape(-1)
    for h in range(H_KV):
        idx = e_idx[h][e_valid[h]]
        qh = q[0, h * G:(h + 1) * G]
        s = qh @ kfull[h, idx].T * scale
        l_e[h * G:(h + 1) * G] = torch.logsumexp(s, -1)
        o_e[h * G:(h + 1) * G] = torch.softmax(s, -1) @ v[h, idx]
        rpos = torch.from_numpy(rtoks[rvalid[h]])
        keys = torch.cat([kfull[h, idx], pol.keys(st, h, rpos)])
        vals = torch.cat([v[h, idx], v[h, rpos]])
        o_ref[h * G:(h + 1) * G] = torch.softmax(qh @ keys.T * scale, -1) @ vals

    def values(b, blk):                                            # [n, H_kv, bs, D]
        return v[:, :T // BS * BS].reshape(H_KV, -1, BS, D)[:, torch.from_numpy(blk)].transpose(0, 1)

    got = pol.attend_rebuilt(work, q, o_e[None], l_e[None], values)[0]
    d = (got - o_ref).abs()
    print(f"rebuilt + exact vs one softmax: max {d.max():.2e} mean {d.mean():.2e}")
    assert d.max() < 1e-5
    assert pol.lowrank.rebuilt == int(rvalid.sum())
    # a head with nothing rebuilt keeps its exact part bit for bit
    none1 = masks.copy()
    none1[:, 1] = 0
    got1 = pol.attend_rebuilt([(0, st, blocks, none1)], q, o_e[None], l_e[None], values)[0]
    assert torch.equal(got1[G:], o_e[G:]) and torch.allclose(got1[:G], got[:G], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


def test_low_rank_end_to_end(tiny_path):
    """On the tiny model at 1/4: low rank changes the logits against ShadowKV's exact keys
    (rebuilt keys are used), full rank does not (up to rounding), and the factors are smaller
    than the keys they stand for."""
    ids = LLM(tiny_path, dtype="float32").encode("the quick brown fox jumps over the lazy dog; " * 8)[:220]
    kw = dict(dtype="float32", prefill_chunk=32, sparse_budget="1/4", sparse_dense_layers="none")
    runs = {}
    for name, extra in (("shadowkv", {}), ("full", dict(sparse_rank=1 << 20)), ("low", dict(sparse_rank=4))):
        pol = "shadowkv" if name == "shadowkv" else "shadowkv_lowrank"
        llm = LLM(tiny_path, sparse_policy=pol, **extra, **kw)
        try:
            runs[name] = (llm.engine.teacher_forced_logits(ids, 70), llm.engine.kv.policy)
        finally:
            llm.close()
    ref = runs["shadowkv"][0]
    d_full = (runs["full"][0] - ref).abs().max().item()
    d_low = (runs["low"][0] - ref).abs().max().item()
    print(f"vs shadowkv: full rank max {d_full:.2e}, rank 4 max {d_low:.2e}")
    assert d_full < 1e-4 < d_low
    pol = runs["low"][1]
    assert pol.lowrank.rebuilt > 0 and pol.lowrank.steps > 0
