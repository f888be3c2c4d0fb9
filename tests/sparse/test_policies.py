"""Sparse policies, parametrised over the registry: full budget = dense; offloaded = in-memory;
budgets hold; the chosen blocks/tokens are the true top-k on crafted inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvoffload.api import LLM
from kvoffload.attention.tiered import TieredBackend
from kvoffload.config import SparseConfig
from kvoffload.errors import ConfigError
from kvoffload.sparse import make_policy
from kvoffload.sparse.base import Selection
from kvoffload.sparse.calibrate import ChannelRecorder, channel_file
from kvoffload.sparse.registry import POLICIES

TEXT = "the quick brown fox jumps over the lazy dog; " * 8


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


@pytest.fixture(scope="module")
def calibration(tiny_path, tmp_path_factory):
    """A channel file for the tiny model (random token blocks)."""
    llm = LLM(tiny_path, dtype="float32")
    path = str(tmp_path_factory.mktemp("calib") / "channels.json")
    calibrate_tiny(llm, path, seed=0)
    return path


def calibrate_tiny(llm: LLM, path: str, seed: int) -> None:
    from kvoffload.model.interface import ForwardBatch, Logits, Phase

    rec = ChannelRecorder(llm.model_config)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for _ in range(3):
            ids = torch.randint(0, 256, (1, 64), generator=g)
            batch = ForwardBatch(Phase.PREFILL, (0,), torch.arange(64)[None], (0,), Logits.NONE)
            llm.model(ids, batch, rec)
    channel_file(rec, path, {"model": "tiny", "seed": seed})


@pytest.fixture(scope="module")
def dense(tiny_path):
    return LLM(tiny_path, dtype="float32", prefill_chunk=32)


def sparse_llm(path: str, policy: str, budget: str, calibration: str, **kw) -> LLM:
    return LLM(path, dtype="float32", prefill_chunk=32, sparse_policy=policy, sparse_budget=budget,
               sparse_calibration=calibration, **kw)


def forced(llm: LLM, ids: list[int], prefill: int) -> torch.Tensor:
    return llm.engine.teacher_forced_logits(ids, prefill)


def same_run(fast: LLM, slow: LLM, a: list, b: list) -> None:
    """Two generations of the same prompts: the same tokens, every top-5 logprob digit for digit,
    and the same sparse counters (and some reading skipped)."""
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert [t.top for t in x.logprobs] == [t.top for t in y.logprobs]
    sa, sb = fast.engine.kv.stats().sparse, slow.engine.kv.stats().sparse
    assert (sa.steps, sa.context, sa.attended, sa.read) == (sb.steps, sb.context, sb.attended, sb.read)
    assert 0 < sa.read < sa.context


def diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    d = (a - b).abs()
    print(f"{what}: max {d.max().item():.2e} mean {d.mean().item():.2e}")
    return d.max().item()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("where", ["memory", "disk"])
def test_full_budget_equals_dense(dense, tiny_path, calibration, policy, where):
    """Budget = the whole context: every policy reads everything and is dense attention. (A
    policy that rebuilds keys from low-rank factors, shadowkv_lowrank, is approximate by design:
    here at full rank, where the factors give the keys back up to fp32 rounding;
    test_shadowkv_lowrank.py checks the low-rank error.)"""
    ids = dense.encode(TEXT)[:200]
    ref = forced(dense, ids, 60)
    tier = dict(kv_host_budget=0, disk_workers=1) if where == "disk" else {}
    if POLICIES[policy].rebuilds_keys:
        tier["sparse_rank"] = 1 << 20
    llm = sparse_llm(tiny_path, policy, "all", calibration, sparse_dense_layers="none", **tier)
    try:
        got = forced(llm, ids, 60)
        assert diff(got, ref, f"{policy} at full budget ({where})") < 1e-4
        st = llm.engine.kv.stats().sparse
        assert st.steps > 0 and st.read_fraction == 1.0
    finally:
        llm.close()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("read_blocks,workers,cache,ahead", [(1, 2, 0, True), (2, 2, 0, True), (1, 0, 0, True),
                                                            (1, 0, 24, True), (2, 2, 48, True), (1, 0, 0, False),
                                                            (1, 0, 24, False)])
def test_offloaded_sparse_equals_in_memory_sparse(tiny_path, calibration, policy, read_blocks, workers, cache, ahead):
    """The same policy at 1/4 over host + disk blocks (read through two workers or in this
    process, token masks in the native kernel, chosen blocks read alone or in aligned pairs, the
    next layer's blocks guessed and read ahead, a block cache of ``cache`` KiB carved from the
    host budget) gives the logits of the contiguous in-memory reference path. Without the guess
    and with the disk read here, block by block, a native-selection policy takes the direct
    step (TieredBackend._sparse_direct: addresses resolved in C, the misses read, one kernel
    call): the same bits again."""
    ids = LLM(tiny_path, dtype="float32").encode(TEXT)[:220]
    geometry = dict(sparse_dense_layers="none", block_size=8, chunk_blocks=2)     # 4 KiB chunks
    mem = sparse_llm(tiny_path, policy, "1/4", calibration, **geometry)
    off = sparse_llm(tiny_path, policy, "1/4", calibration, kv_host_budget=f"{8 + cache}KiB", disk_workers=workers,
                     kv_recent_tokens=16, kv_sink_tokens=0, disk_read_blocks=read_blocks, sparse_prefetch=ahead,
                     disk_block_cache=f"{cache}KiB", **geometry)
    try:
        a, b = forced(mem, ids, 70), forced(off, ids, 70)
        diff(b, a, f"{policy} 1/4 offloaded vs in memory")
        assert torch.equal(a, b)                      # the same chunks, the same kernel, the same merge order
        sa, sb = mem.engine.kv.stats().sparse, off.engine.kv.stats().sparse
        assert (sa.read, sa.attended) == (sb.read, sb.attended)
        assert 0 < sb.attended / sb.context < 0.35 and sb.read <= sb.context
        direct = not ahead and workers == 0 and read_blocks == 1 and not POLICIES[policy].rebuilds_keys
        assert (off.engine.kv._step is not None) == direct
        tiers = off.engine.kv.stats().tiers
        assert tiers["disk"].read > 0
        d = tiers["disk"]
        print(f"disk blocks attended {d.blocks}, of them read ahead {d.ahead}, from the block cache {d.cached}")
        assert 0 < d.ahead + d.cached <= d.blocks or not ahead and not cache
        assert (d.ahead > 0) == ahead and (d.cached > 0) == (cache > 0)
        assert sum(off.engine.kv.store.memory_held()[t] for t in ("host",)) <= 8 << 10    # the cache came out of it
    finally:
        off.close()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("where", ["memory", "disk", "device+disk"])
def test_one_call_sparse_step_equals_the_python_items(tiny_path, calibration, policy, where):
    """In memory, a native sparse layer in ONE call (kernels/select.py's SparseStep: select, cut
    the union into items, append, attend, merge, all in C) gives the bits of the same selection
    cut into DecodeItems in Python and attended by a second call: a ragged batch of three
    sequences decoding across block and chunk boundaries, SparF's correction included. With the
    KV over host RAM, a block cache and a disk shard read in this process, the direct step
    (addresses resolved in C, the misses read between two native calls) gives the bits of the
    per-tier requests."""
    from kvoffload.config import SamplingParams

    ids = LLM(tiny_path, dtype="float32").encode(TEXT)
    prompts = [ids[:37], ids[:70], ids[:129]]
    geometry = dict(sparse_dense_layers="0", block_size=8, chunk_blocks=2)
    if where != "memory":             # (with a device tier on the CPU too: two memory tiers)
        geometry |= dict(kv_host_budget="24KiB", disk_block_cache="8KiB", disk_workers=0, kv_recent_tokens=16,
                         kv_sink_tokens=0, kv_device_budget="8KiB" if where == "device+disk" else None)
    fast = sparse_llm(tiny_path, policy, "1/4", calibration, **geometry)
    slow = sparse_llm(tiny_path, policy, "1/4", calibration, **geometry)
    slow.engine.kv.one_call = False
    params = SamplingParams(max_tokens=28, ignore_eos=True, logprobs=5)
    try:
        a, b = fast.generate(prompts, params), slow.generate(prompts, params)
        one_call = not POLICIES[policy].rebuilds_keys          # (keys rebuilt from factors: the Python path)
        assert (fast.engine.kv._step is not None) == one_call and slow.engine.kv._step is None
        same_run(fast, slow, a, b)
        if where != "memory":
            ta, tb = fast.engine.kv.stats().tiers, slow.engine.kv.stats().tiers
            for name in ("host", "disk") + (("device",) if where == "device+disk" else ()):
                print(name, ta[name], tb[name])
                assert (ta[name].blocks, ta[name].read > 0) == (tb[name].blocks, tb[name].read > 0)
            assert ta["host"].read == tb["host"].read and ta["disk"].cached > 0
            if where == "device+disk":
                assert ta["device"].read == tb["device"].read > 0
    finally:
        fast.close()
        slow.close()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kv_dtype,where", [("int8", "disk"), ("int4", "host"), ("float32", "host"),
                                             ("bfloat16", "host"), ("int8", "budget")])
def test_tiered_direct_sparse_step_equals_the_requests(tiny_path, calibration, policy, kv_dtype, where):
    """The tiered backend's direct sparse step gives the bits of the per-tier requests. With
    compressed blocks (int8 / int4) and full-precision tails it attends the blocks with the
    compressed kernel and the tails (appended to) with theirs, then merges each sequence's parts
    in the requests' order (select.c's attn_blocks). With every block in RAM it runs inside the
    fused layer's native call (``native_decode``: no Python between the projections and the
    attention; bf16 KV under fp32 activations: the new k / v rounded in the hook), the bits of
    the same step called from Python. Over host RAM alone, with a disk
    shard and block cache read in this process, and with a host budget that holds every block
    beside two disk workers that hold none (the step stays direct); a ragged batch across block
    and chunk boundaries, SparF's correction included."""
    from kvoffload.config import SamplingParams

    ids = LLM(tiny_path, dtype="float32").encode(TEXT)
    prompts = [ids[:37], ids[:70], ids[:129]]
    geometry = dict(sparse_dense_layers="0", block_size=8, chunk_blocks=2, kv_dtype=kv_dtype,
                    quantization="int8")                    # (int8 weights: fused native decode layers)
    if where == "disk":
        geometry |= dict(kv_host_budget="12KiB", disk_block_cache="4KiB", disk_workers=0, kv_recent_tokens=16,
                         kv_sink_tokens=0)
    elif where == "host":
        geometry |= dict(kv_tiers="host:1GiB")             # (the tiered store, every block in RAM)
    else:
        geometry |= dict(kv_host_budget="1GiB", disk_workers=2)
    fast, unhooked, slow = (sparse_llm(tiny_path, policy, "1/4", calibration, **geometry) for _ in range(3))
    unhooked.engine.kv.native_hook = False
    slow.engine.kv.one_call = False
    hooked = []
    spy = fast.engine.kv._sparse_hook
    fast.engine.kv._sparse_hook = lambda *a: hooked.append(spy(*a)) or hooked[-1]
    params = SamplingParams(max_tokens=28, ignore_eos=True, logprobs=5)
    try:
        a, u, b = (llm.generate(prompts, params) for llm in (fast, unhooked, slow))
        one_call = not POLICIES[policy].rebuilds_keys
        assert (fast.engine.kv._step is not None) == one_call and slow.engine.kv._step is None
        if one_call:                                    # the two-kernel step ran for compressed blocks only
            assert bool(fast.engine.kv._step.struct.attn_blocks) == (kv_dtype in ("int8", "int4"))
        # in a fused layer where nothing is read between the calls, and the policy has no correction
        assert any(h is not None for h in hooked) == (one_call and where != "disk" and policy != "sparf")
        same_run(fast, slow, a, b)
        same_run(unhooked, slow, u, b)
        ta, tu, tb = (llm.engine.kv.stats().tiers for llm in (fast, unhooked, slow))
        assert ("disk" in ta) == (where != "host") and (where != "budget" or ta["disk"].blocks == 0)
        for name in ("host",) + (("disk",) if where == "disk" else ()):
            print(name, ta[name], tb[name])
            assert (ta[name].blocks, ta[name].read) == (tb[name].blocks, tb[name].read) and ta[name].read > 0
            assert (tu[name].blocks, tu[name].read) == (tb[name].blocks, tb[name].read)
        assert fast.engine.kv.stats().sparse == slow.engine.kv.stats().sparse
        if where == "disk":
            assert ta["disk"].cached > 0
    finally:
        for llm in (fast, unhooked, slow):
            llm.close()


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_fused_layers_take_the_sparse_step_inside_their_native_call(tiny_path, calibration, policy, kv_dtype):
    """With quantised weights (fused native layers) and the KV in memory, a sparse layer's
    one-call step runs inside the layer's own native call (the backend's native hook: selection,
    items, append, attention, merge): the same tokens, every logprob digit and the same sparse
    counters as the layer calling ``backend.decode``; SparF (an output correction) and the
    policies that rebuild keys keep ``decode``. fp32 compute with bf16 KV: k/v rounded in the hook."""
    from kvoffload.attention.dense import DenseBackend
    from kvoffload.config import SamplingParams

    ids = LLM(tiny_path, dtype="float32").encode(TEXT)
    prompts = [ids[:37], ids[:70], ids[:129]]
    kw = dict(sparse_dense_layers="0", block_size=8, chunk_blocks=2, quantization="int8", kv_dtype=kv_dtype)
    fast = sparse_llm(tiny_path, policy, "1/4", calibration, **kw)
    slow = sparse_llm(tiny_path, policy, "1/4", calibration, **kw)
    slow.engine.kv.native_hook = False
    hooked = []
    real = DenseBackend.native_decode

    def spy(self, layer, batch, dtype):
        got = real(self, layer, batch, dtype)
        hooked.append(bool(got) and self.policy.sparse(layer))
        return got

    params = SamplingParams(max_tokens=28, ignore_eos=True, logprobs=5)
    try:
        DenseBackend.native_decode = spy
        a, b = fast.generate(prompts, params), slow.generate(prompts, params)
    finally:
        DenseBackend.native_decode = real
        fast.close()
        slow.close()
    assert any(hooked) == (policy != "sparf" and not POLICIES[policy].rebuilds_keys)
    same_run(fast, slow, a, b)


def test_native_masked_kernel_equals_torch_fallback(tiny_path, calibration):
    """Token masks in the paged kernel vs the gather + masked-softmax path of the workers."""
    ids = LLM(tiny_path, dtype="float32").encode(TEXT)[:160]
    kw = dict(sparse_dense_layers="none", kv_host_budget="1GiB")
    a = sparse_llm(tiny_path, "sparf", "1/4", calibration, **kw)
    b = sparse_llm(tiny_path, "sparf", "1/4", calibration, **kw)
    b.engine.kv.close()
    b.engine.kv = TieredBackend(b.model_config, b.config.kv, b.device, torch.float32, torch.float32, 2, native=False,
                                policy=make_policy(b.config.sparse, b.model_config, b.config.kv.block_size, b.device))
    try:
        assert diff(forced(a, ids, 50), forced(b, ids, 50), "sparf masked: native vs torch") < 1e-4
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- selection itself

class Geometry:
    num_kv_heads, head_dim, num_heads, num_layers = 2, 16, 4, 1


def policy_for(name: str, budget: str, calibration: str | None = None, **kw):
    cfg = SparseConfig(sparse_policy=name, sparse_budget=budget, sparse_dense_layers="none",
                       sparse_calibration=calibration, **kw)
    return make_policy(cfg, Geometry, 16, torch.device("cpu"))


def feed(pol, k: torch.Tensor, v: torch.Tensor, pieces=(100, 57, 1)) -> None:
    """Append k/v ``[H_kv, T, D]`` in uneven chunks (prefill chunks, then decode steps)."""
    T, at = k.shape[1], 0
    pol.allocate(0, T)
    for n in pieces:
        pol.append(0, 0, at, k[:, at:at + n], v[:, at:at + n])
        at += n
    while at < T:
        pol.append(0, 0, at, k[:, at:at + 1], v[:, at:at + 1])
        at += 1


def chosen_tokens(sel: Selection, length: int, bs: int = 16) -> list[set[int]]:
    idx, valid = sel.token_index(length, bs)
    return [set(idx[h][valid[h]].tolist()) for h in range(idx.shape[0])]


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "streaming"])
def test_planted_keys_are_chosen(policy, calibration, tmp_path):
    """Keys planted along the query (a few tokens per head, mid-sequence) are all attended at a
    budget of 1/4, whatever else the policy picks."""
    torch.manual_seed(0)
    T, H_kv, D = 400, 2, 16
    k, v = torch.randn(H_kv, T, D) * 0.3, torch.randn(H_kv, T, D)
    q = torch.randn(4, D)
    hot = [[70, 71, 200], [130, 131, 290]]              # per KV head
    for h, toks in enumerate(hot):
        for t in toks:                                   # a chunk-mate too (ShadowKV scores 8-token means)
            k[h, t - t % 8:t - t % 8 + 8] = 4.0 * q[2 * h] / q[2 * h].norm() + 0.01 * torch.randn(8, D)
    cal = None
    if policy == "double_sparsity":                      # every channel calibrated "important": exact labels
        cal = str(tmp_path / "all.json")
        import json
        json.dump({"format": "kvoffload-channels/1", "channels": [[list(range(D))] * H_kv]}, open(cal, "w"))
    # retrieval's default 128-token recent window would take this whole 100-token budget
    extra = {"sparse_recent_tokens": 32} if policy == "retrieval" else {}
    pol = policy_for(policy, "1/4", cal, sparse_channels=D if policy in ("sparf", "double_sparsity") else None, **extra)
    feed(pol, k, v)
    sel = pol.select(0, 0, q, T)
    got = chosen_tokens(sel, T)
    for h in range(H_kv):
        assert set(hot[h]) <= got[h], (policy, h, sorted(set(hot[h]) - got[h]))
        assert len(got[h]) <= pol.cfg.budget_tokens(T)


@pytest.mark.parametrize("policy", ["sparf", "double_sparsity"])
def test_token_policies_pick_the_exact_top_k(policy, tmp_path):
    """With every channel used, approximate scores are exact: the chosen middle tokens are the
    top-k per KV head of the group's largest q.k (Double Sparsity) or largest softmax weight
    (SparF, whose scores are SparQ's softmax over all tokens)."""
    import json

    torch.manual_seed(1)
    T, H_kv, D = 300, 2, 16
    k, v = torch.randn(H_kv, T, D), torch.randn(H_kv, T, D)
    q = torch.randn(4, D)
    cal = str(tmp_path / "all.json")
    json.dump({"format": "kvoffload-channels/1", "channels": [[list(range(D))] * H_kv]}, open(cal, "w"))
    pol = policy_for(policy, "64", cal, sparse_channels=D)
    feed(pol, k, v)
    sel = pol.select(0, 0, q, T)
    n_full = (T - 1) // 16
    tail = T - n_full * 16
    s = torch.einsum("hgd,htd->hgt", q.view(H_kv, 2, D), k)                            # [H_kv, G, T]
    if policy == "sparf":
        s = torch.softmax(s / D ** 0.5, dim=-1)
    s = s[:, :, :n_full * 16].amax(1)                                                  # [H_kv, n]
    for h in range(H_kv):
        want = set(s[h].topk(64 - tail).indices.tolist())
        got = chosen_tokens(sel, T)[h] - set(range(n_full * 16, T))
        assert got == want


def test_quest_picks_blocks_by_the_upper_bound():
    torch.manual_seed(2)
    T, H_kv, D = 300, 2, 16
    k, v = torch.randn(H_kv, T, D), torch.randn(H_kv, T, D)
    q = torch.randn(4, D)
    pol = policy_for("quest", "64")
    feed(pol, k, v)
    sel = pol.select(0, 0, q, T)
    nb = (T - 1) // 16
    kb = k[:, :nb * 16].view(H_kv, nb, 16, D)
    qg = q.view(H_kv, 2, 1, D)
    bound = torch.maximum(qg * kb.amax(2)[:, None], qg * kb.amin(2)[:, None]).sum(-1).amax(1)   # [H_kv, nb]
    k_blocks = (64 - (T - nb * 16)) // 16
    for h in range(H_kv):
        assert sel.blocks[h].tolist() == sorted(bound[h].topk(k_blocks).indices.tolist())


def test_streaming_keeps_sinks_and_the_newest_blocks():
    pol = policy_for("streaming", "80")
    k = torch.randn(2, 300, 16)
    feed(pol, k, k)
    sel = pol.select(0, 0, torch.randn(4, 16), 300)
    # 4 sink tokens -> block 0; tail = 300 - 18*16 = 12 tokens; 80 - 12 - 16 = 52 -> 3 newest blocks
    assert [b.tolist() for b in sel.blocks] == [[0, 15, 16, 17]] * 2


def test_sparf_alpha_is_the_approximate_mass():
    torch.manual_seed(3)
    pol = policy_for("sparf", "all")
    k, v = torch.randn(2, 100, 16), torch.randn(2, 100, 16)
    feed(pol, k, v, pieces=(99,))
    sel = pol.select(0, 0, torch.randn(4, 16), 100)
    assert torch.allclose(sel.alpha, torch.ones(4), atol=1e-5)
    assert torch.allclose(sel.vmean, v.mean(1), atol=1e-5)


# --------------------------------------------------------------------------- calibration, config

def test_calibration_is_deterministic(tiny_path, tmp_path):
    import json

    llm = LLM(tiny_path, dtype="float32")
    a, b, c = (str(tmp_path / f"{n}.json") for n in "abc")
    calibrate_tiny(llm, a, seed=5)
    calibrate_tiny(llm, b, seed=5)
    calibrate_tiny(llm, c, seed=6)
    ja, jb, jc = (json.load(open(p)) for p in (a, b, c))
    assert ja["channels"] == jb["channels"]
    assert ja["scores"] != jc["scores"]
    shape = np.array(ja["channels"]).shape
    assert shape == (3, 2, 16)
    assert all(sorted(h) == list(range(16)) for layer in ja["channels"] for h in layer)


@pytest.mark.parametrize("kw,words", [
    (dict(sparse_policy="nope"), "unknown sparse policy"),
    (dict(sparse_policy="quest", sparse_budget="1/0"), "bad sparse budget"),
    (dict(sparse_policy="quest", sparse_budget="1.5"), "more than 1"),
    (dict(sparse_policy="double_sparsity"), "kvoffload calibrate"),
    (dict(sparse_policy="double_sparsity", sparse_calibration="/nonexistent.json"), "does not exist"),
    (dict(sparse_policy="quest", sparse_dense_layers="0,7"), "has 3 layers"),
    (dict(sparse_policy="shadowkv", sparse_chunk=5), "multiple of 5"),
])
def test_bad_settings_are_config_errors(tiny_path, kw, words):
    with pytest.raises(ConfigError, match=words):
        LLM(tiny_path, dtype="float32", **kw)


def test_calibration_for_another_model_is_refused(tiny_path, tmp_path):
    import json

    p = tmp_path / "other.json"
    json.dump({"format": "kvoffload-channels/1", "channels": [[list(range(64))] * 3] * 30}, open(p, "w"))
    with pytest.raises(ConfigError, match="this model has"):
        LLM(tiny_path, dtype="float32", sparse_policy="double_sparsity", sparse_calibration=str(p))


def test_generate_with_a_policy_batches(dense, tiny_path):
    """A batch of ragged sequences decodes with a policy (full budget: the dense tokens)."""
    from kvoffload import SamplingParams

    prompts = [TEXT, "hello", TEXT[:77]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [o.token_ids for o in dense.generate(prompts, params)]
    llm = sparse_llm(tiny_path, "quest", "all", None)
    assert [o.token_ids for o in llm.generate(prompts, params)] == ref
    tier = sparse_llm(tiny_path, "shadowkv", "all", None, kv_host_budget="64KiB", chunk_blocks=1)
    try:
        assert [o.token_ids for o in tier.generate(prompts, params)] == ref
    finally:
        tier.close()
