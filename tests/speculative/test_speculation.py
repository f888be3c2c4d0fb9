"""Self-speculative decoding: greedy output identical to plain decoding for every KV placement
(batched, ragged); the verify pass equals decode step by step (max/mean logit differences);
commit keeps exactly the accepted tokens and rolls the rest back; speculative sampling follows
the target distribution (chi-square, synthetic and end to end on a tiny model)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from placements import PLACEMENTS as TIER_PLACEMENTS

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.config import EngineConfig, SpecConfig
from kvoffload.errors import ConfigError
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.sampling import processed_probs, speculative_accept
from kvoffload.sparse.calibrate import ChannelRecorder, channel_file
from kvoffload.sparse.registry import POLICIES

# every placement of the tier registry, and in memory; block size 4 (and 4-token retrieval
# chunks) so that chunks spill within a few tokens
PLACEMENTS = {"in-memory": dict(block_size=4), **TIER_PLACEMENTS}
PROMPTS = [list(range(10, 140)), list(range(40, 75)), [5, 6, 7] * 20, [9]]
SMALL_DRAFT = dict(spec_draft_budget=16, spec_draft_share="1/2", spec_draft_window=8, sparse_chunk=4)


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


@pytest.fixture(scope="module")
def plain(tiny_path):
    return LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4)


def spec_llm(path: str, **kw) -> LLM:
    opts = dict(dtype="float32", prefill_chunk=16, max_num_seqs=4, speculate="self", num_speculative_tokens=3,
                block_size=4)
    return LLM(path, **{**opts, **SMALL_DRAFT, **kw})


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_greedy_identical_every_placement(plain, tiny_path, name):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = [o.token_ids for o in plain.generate(PROMPTS, params)]
    llm = spec_llm(tiny_path, **PLACEMENTS[name])
    try:
        got = [o.token_ids for o in llm.generate(PROMPTS, params)]      # 4 ragged sequences, verified together
        st = llm.engine.spec.stats
        print(f"{name}: {st.line()}")
        assert got == ref
        assert 0 < st.accepted < st.drafted            # both paths taken: accepts and rejections
        assert st.rebuilds["window"] > 0               # the draft cache went stale and was rebuilt
        if name != "in-memory":     # committed: every output token but the last, plus what a final
            fed = sum(len(t) - 1 for t in got)          # round accepted past max_tokens (dropped)
            assert fed <= llm.engine.kv.stats().decode_tokens <= fed + len(got) * 3
    finally:
        llm.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_any_policy_drafts_losslessly(plain, tiny_path, policy, tmp_path):
    """Every registered sparse policy can choose the draft cache; greedy output is unchanged."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in plain.generate(PROMPTS[:2], params)]
    extra = {}
    if policy == "double_sparsity":                    # its label channels come from a calibration file
        extra["sparse_calibration"] = str(tmp_path / "channels.json")
        rec = ChannelRecorder(plain.model_config)
        with torch.inference_mode():
            ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
            plain.model(ids, ForwardBatch(Phase.PREFILL, (0,), torch.arange(64)[None], (0,), Logits.NONE), rec)
        channel_file(rec, extra["sparse_calibration"], {"model": "tiny"})
    llm = spec_llm(tiny_path, spec_draft_policy=policy, **extra)
    got = [o.token_ids for o in llm.generate(PROMPTS[:2], params)]
    print(f"{policy}: {llm.engine.spec.stats.line()}")
    assert got == ref


@pytest.mark.parametrize("rebuild", [dict(spec_rebuild_interval=2), dict(spec_rebuild_acceptance=0.99, spec_rebuild_rounds=2)])
def test_rebuild_triggers(plain, tiny_path, rebuild):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = plain.generate([PROMPTS[0]], params)[0].token_ids
    llm = spec_llm(tiny_path, spec_draft_window=64, **rebuild)
    got = llm.generate([PROMPTS[0]], params)[0].token_ids
    why = "interval" if "spec_rebuild_interval" in rebuild else "acceptance"
    assert got == ref
    assert llm.engine.spec.stats.rebuilds[why] > 0 and llm.engine.spec.stats.rebuilds["window"] == 0


def _verify_then_decode(llm: LLM, ids: list[int], P: int, L: int, keep: int) -> torch.Tensor:
    """Prefill ids[:P]; verify ids[P:P+L] in one pass; commit ``keep`` of them; then decode
    ids[P+keep:] one at a time. Returns the verify rows' logits then the decode rows'."""
    eng, kv = llm.engine, llm.engine.kv
    sid = 20_000
    kv.allocate(sid, len(ids))
    rows = []
    with torch.inference_mode():
        for s in range(0, P, 16):
            e = min(s + 16, P)
            eng.model(torch.tensor([ids[s:e]]), ForwardBatch(Phase.PREFILL, (sid,), torch.arange(s, e)[None], (s,), Logits.NONE), kv)
        batch = ForwardBatch(Phase.VERIFY, (sid,), torch.arange(P, P + L)[None], (P,), Logits.ALL)
        rows.append(eng.model(torch.tensor([ids[P:P + L]]), batch, kv)[0])
        kv.commit(sid, keep)
        for p in range(P + keep, len(ids) - 1):
            batch = ForwardBatch(Phase.DECODE, (sid,), torch.tensor([[p]]), (p,))
            rows.append(eng.model(torch.tensor([[ids[p]]]), batch, kv))
    kv.free(sid)
    return torch.cat(rows)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_verify_and_rollback_equal_decode(plain, tiny_path, name):
    """A verify pass gives the decode path's logits; after a commit of 2 of its 6 tokens the
    store holds exactly P + 2 tokens (the 4 rolled back leave no trace in later steps)."""
    ids = list(range(20, 80))
    P, L, keep = 37, 6, 2
    ref = plain.engine.teacher_forced_logits(ids, P)                   # row i predicts ids[P + i]
    llm = LLM(tiny_path, dtype="float32", **PLACEMENTS[name])
    try:
        got = _verify_then_decode(llm, ids, P, L, keep)
        want = torch.cat([ref[1:L + 1], ref[keep + 1:]])
        d = (got - want).abs()
        print(f"{name}: verify {d[:L].max():.2e}/{d[:L].mean():.2e}, after rollback {d[L:].max():.2e}/{d[L:].mean():.2e} (max/mean)")
        assert d.max().item() < 1e-4
        if name != "in-memory":
            assert all(t.used == 0 for t in llm.engine.kv.tiers)        # every chunk freed
    finally:
        llm.close()


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_gather_reads_back_the_store(plain, tiny_path, name):
    ids = list(range(30, 97))
    llm = LLM(tiny_path, dtype="float32", **PLACEMENTS[name])
    try:
        ref_kv, kv = plain.engine.kv, llm.engine.kv
        for backend in (ref_kv, kv):
            backend.allocate(7, len(ids))
            with torch.inference_mode():
                batch = ForwardBatch(Phase.PREFILL, (7,), torch.arange(len(ids))[None], (0,), Logits.NONE)
                llm.model(torch.tensor([ids]), batch, backend)
        g = torch.Generator().manual_seed(0)
        cfg = llm.model_config
        index = torch.randint(0, len(ids), (cfg.num_layers, cfg.num_kv_heads, 23), generator=g)
        k0, v0 = ref_kv.gather(7, index)
        k1, v1 = kv.gather(7, index)
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    finally:
        ref_kv.free(7)
        llm.close()


# ------------------------------------------------------------------ speculative sampling

def test_accept_greedy():
    logits = torch.full((4, 10), -5.0)
    for i, t in enumerate([3, 4, 7, 1]):
        logits[i, t] = 5.0
    greedy = SamplingParams()
    assert speculative_accept(logits, [3, 4, 7], [None] * 3, greedy, None) == [3, 4, 7, 1]      # all + bonus
    assert speculative_accept(logits, [3, 9, 7], [None] * 3, greedy, None) == [3, 4]           # correction
    assert speculative_accept(logits, [0, 4, 7], [None] * 3, greedy, None) == [3]


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty; z = 3.09 is the normal's 0.999 quantile)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: Counter, probs: dict[int, float], n: int) -> tuple[float, int]:
    """Pearson's statistic over the bins (expected < 5 pooled into one bin) and its dof."""
    stat, pooled_o, pooled_e, bins = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        e = n * p
        if e < 5:
            pooled_o += counts.get(key, 0)
            pooled_e += e
            continue
        stat += (counts.get(key, 0) - e) ** 2 / e
        bins += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        bins += 1
    assert sum(counts.values()) == n and set(counts) <= set(probs)
    return stat, bins - 1


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.6, 0), (1.0, 3)])
def test_accept_follows_target_distribution(temperature, top_k):
    """Synthetic target/draft distributions far apart: the first output token follows the
    target's p_0, and the one after an accepted draft token follows p_1."""
    g = torch.Generator().manual_seed(1)
    V = 6
    target = torch.randn(3, V, generator=g) * 2
    draft_logits = torch.randn(2, V, generator=g) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k)
    q = [processed_probs(draft_logits[i], params) for i in range(2)]
    p = [processed_probs(target[i], params) for i in range(3)]
    n = 6000
    first, second, accepted = Counter(), Counter(), 0
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = speculative_accept(target, drafts, q, params, g)
        first[out[0]] += 1
        if out[0] == drafts[0]:
            accepted += 1
    stat, df = chi2(first, {t: float(p[0][t]) for t in range(V)}, n)
    print(f"T={temperature} top_k={top_k}: chi2 {stat:.1f} (df {df}, 0.1% point {chi2_critical(df):.1f}); "
          f"accepted {accepted / n:.2f}")
    assert stat < chi2_critical(df)
    assert 0.05 < accepted / n < 0.95                       # both branches exercised
    # the second token, among runs whose first draft token was accepted, follows p_1
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        out = speculative_accept(target, drafts, q, params, g)
        if len(out) >= 2:
            second[out[1]] += 1
    m = sum(second.values())
    stat, df = chi2(second, {t: float(p[1][t]) for t in range(V)}, m)
    assert stat < chi2_critical(df)


def test_sampled_outputs_follow_target_end_to_end(plain, tiny_path):
    """Tiny model, temperature 1, top-k 6: the joint law of the first two generated tokens
    (the second from a speculation round with a poor draft) matches p(t1) p(t2 | t1)."""
    prompt = list(range(60, 120))
    params_of = [SamplingParams(temperature=1.0, top_k=6, max_tokens=2, ignore_eos=True, seed=s) for s in range(1200)]
    llm = spec_llm(tiny_path, max_num_seqs=64, num_speculative_tokens=2, prefill_chunk=64)
    outs = llm.generate([prompt] * len(params_of), params_of)
    pairs = Counter(tuple(o.token_ids[:2]) for o in outs)
    sp = params_of[0]
    p1 = processed_probs(plain.engine.prompt_logits(prompt)[-1], sp)
    probs = {}
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = processed_probs(plain.engine.prompt_logits(prompt + [t1])[-1], sp)
        for t2 in torch.nonzero(p2).flatten().tolist():
            probs[(t1, t2)] = float(p1[t1] * p2[t2])
    stat, df = chi2(pairs, probs, len(outs))
    st = llm.engine.spec.stats
    print(f"chi2 {stat:.1f} (df {df}, 0.1% point {chi2_critical(df):.1f}); {st.line()}")
    assert stat < chi2_critical(df)
    assert 0 < st.accepted < st.drafted


# ------------------------------------------------------------------ configuration

@pytest.mark.parametrize("kw,msg", [
    (dict(speculate="self", sparse_policy="quest"), "--spec-draft-policy"),
    (dict(speculate="maybe"), "speculate must be"),
    (dict(speculate="self", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculate="self", spec_draft_share="512"), "fraction"),
    (dict(speculate="self", spec_rebuild_acceptance=1.5), "spec_rebuild_acceptance"),
])
def test_bad_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EngineConfig().replace(**kw)


def test_unknown_draft_policy(tiny_path):
    with pytest.raises(ConfigError, match="unknown sparse policy"):
        spec_llm(tiny_path, spec_draft_policy="nope")


def test_draft_budget_scales_with_context():
    s = SpecConfig(speculate="self")
    assert s.draft_budget(120_000) == 4096 and s.draft_budget(8192) == 1024 and s.draft_budget(100) == 13


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_truncate_rolls_back_committed_tokens(plain, tiny_path, name):
    """Prefill 50 tokens, truncate to 37 (a cut inside a block), decode on: the logits are
    those of a sequence that never had tokens 37..49."""
    ids = list(range(20, 80))
    P = 37
    ref = plain.engine.teacher_forced_logits(ids, P)
    llm = LLM(tiny_path, dtype="float32", **PLACEMENTS[name])
    eng, kv = llm.engine, llm.engine.kv
    try:
        kv.allocate(5, len(ids))
        rows = []
        with torch.inference_mode():
            for s in range(0, 50, 16):
                e = min(s + 16, 50)
                eng.model(torch.tensor([ids[s:e]]), ForwardBatch(Phase.PREFILL, (5,), torch.arange(s, e)[None], (s,), Logits.NONE), kv)
            kv.truncate(5, P)
            for p in range(P, len(ids) - 1):
                rows.append(eng.model(torch.tensor([[ids[p]]]), ForwardBatch(Phase.DECODE, (5,), torch.tensor([[p]]), (p,)), kv))
        d = (torch.cat(rows) - ref[1:]).abs()
        print(f"{name}: after truncate max {d.max():.2e} mean {d.mean():.2e}")
        assert d.max().item() < 1e-4
    finally:
        kv.free(5)
        llm.close()
