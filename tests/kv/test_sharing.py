"""Prefix sharing within a process: sequences whose prompts start with the same blocks share
them (prefilled once; in the tiered store referenced by each block table, held and budgeted
once, freed with the last user) and give the logits of each prompt prefilled alone (fp32
tolerance) and identical greedy tokens, in memory and in every placement."""

from __future__ import annotations

import os

import pytest
import torch
from placements import GEOMETRY, PLACEMENTS, step_all
from policies import POLICY_CASES, POLICY_IDS, with_calibration

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.attention.dense import DenseBackend
from kvoffload.attention.tiered import TieredBackend
from kvoffload.config import KVConfig
from kvoffload.engine.engine import Engine
from kvoffload.engine.sequence import SeqStatus
from kvoffload.kv.persist.prefix import PrefixStore
from kvoffload.kv.persist.store import BlockDir
from kvoffload.kv.sharing import LivePrefixes

DOC = "the quick brown fox jumps over the lazy dog while the cat sleeps by the fire " * 3
QUESTIONS = [DOC + "question one?", DOC + "and a second, longer question about it?", DOC + "a third?",
             DOC + "fourth: what did the fox do, and the dog, and the cat?"]
# the first question finishes first: the others keep using the blocks it prefilled
PARAMS = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 8, 6, 8)]


@pytest.fixture(scope="module")
def llm(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY)


def engine(llm: LLM, placement: str | None, sharing: bool = True, store: str | None = None, **kv) -> Engine:
    """An engine over ``llm``'s model: the in-memory backend (``placement`` None) or a tiered
    one; with a persistent store in directory ``store``."""
    kvcfg = KVConfig(**{**GEOMETRY, **(PLACEMENTS[placement] if placement else {}), "prefix_sharing": sharing, **kv})
    if placement is None and not kv:
        backend = DenseBackend(llm.model_config, llm.device, torch.float32, block_size=kvcfg.block_size,
                               chunk_blocks=kvcfg.chunk_blocks)
    else:
        backend = TieredBackend(llm.model_config, kvcfg, llm.device, torch.float32, torch.float32, 2)
    prefix = None
    if store is not None:
        prefix = PrefixStore(BlockDir(store, fsync="none"), "fp", backend.layout, llm.model_config.num_layers)
    return Engine(llm.model, backend, llm.tokenizer, llm.config.replace(kv=kvcfg), llm.device, prefix)


def run(eng: Engine, prompts: list[str], llm: LLM, params=PARAMS, watch=None):
    """Greedy tokens, the logits each was sampled from (``[steps, V]`` per prompt) and the prompt
    tokens shared from a live sequence, per prompt (one engine step at a time; ``watch(eng)``
    after each)."""
    seqs, logits = step_all(eng, [(llm.encode(p), q) for p, q in zip(prompts, params)], watch)
    return [s.output_ids for s in seqs], logits, [s.shared_tokens for s in seqs]


@pytest.fixture(scope="module")
def alone(llm):
    """Each question prefilled alone, in full, in memory: (tokens, logits)."""
    toks, logs = [], []
    for q, p in zip(QUESTIONS, PARAMS):
        t, lg, shared = run(engine(llm, None, sharing=False), [q], llm, [p])
        assert shared == [0]
        toks += t
        logs += lg
    return toks, logs


def expected_shared(llm: LLM) -> list[int]:
    """Prompt tokens each question takes from the live ones before it: the common prefix's full
    blocks, short of the block of its last token (always computed)."""
    bs = GEOMETRY["block_size"]
    ids = [llm.encode(q) for q in QUESTIONS]
    out = [0]
    for i in range(1, len(ids)):
        common = max(len(os.path.commonprefix([ids[i], ids[j]])) for j in range(i))
        out.append(min(common // bs, (len(ids[i]) - 1) // bs) * bs)
    return out


@pytest.mark.parametrize("placement", [None, *PLACEMENTS])
def test_shared_prefix_equals_each_alone(llm, alone, placement):
    """Four questions about one document, run together: the document is prefilled once (the
    others share its blocks), and each question's logits equal its own full prefill's within
    fp32 tolerance, greedy tokens identical; every tier is empty at the end."""
    ref_tokens, ref_logits = alone
    eng = engine(llm, placement)
    try:
        tokens, logits, shared = run(eng, QUESTIONS, llm)
        assert shared == expected_shared(llm) and all(s > 0 for s in shared[1:])
        assert eng.prefill_tokens == sum(len(llm.encode(q)) for q in QUESTIONS) - sum(shared)
        for i, (got, ref) in enumerate(zip(logits, ref_logits)):
            diff = (got - ref).abs()
            print(f"{placement} q{i}: max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
            assert diff.max().item() < 1e-4
        assert tokens == ref_tokens
        if isinstance(eng.kv, TieredBackend):
            assert all(t.used == 0 for t in eng.kv.tiers) and not eng.kv.store.placement.users
        assert not eng.live.holders and not eng.scheduler.key_refs and eng.scheduler.kv_reserved == 0
    finally:
        eng.kv.close()


def peak_run(llm: LLM, sharing: bool, **kv) -> tuple[dict, list[list[int]], list[int], int]:
    """QUESTIONS through a tiered engine: the most sequences running at once, with the fast
    tier's chunks and the scheduler's reservation the first time that many decode (prefill-first
    scheduling: right after the last prompt's prefill, each sequence one token in); the greedy
    tokens, the shared tokens, and the bytes of one of the tier's chunks."""
    seen = {"running": 0, "used": 0, "reserved": 0}

    def watch(e: Engine) -> None:
        running = e.scheduler.running
        if len(running) > seen["running"] and all(s.status is SeqStatus.DECODING for s in running):
            seen.update(running=len(running), used=e.kv.tiers[0].used, reserved=e.scheduler.kv_reserved)

    eng = engine(llm, None, sharing, kv_sink_tokens=0, kv_recent_tokens=0, **kv)
    try:
        tokens, _, shared = run(eng, QUESTIONS, llm, watch=watch)
        return seen, tokens, shared, eng.kv.tiers[0].chunk_bytes(eng.kv.layout)
    finally:
        eng.kv.close()


def test_shared_blocks_are_budgeted_once(llm, alone):
    """With the document shared, the host tier holds its whole chunks once (what the tier's
    chunk pool counts and what the scheduler reserves), so a budget that fits the document once
    plus each question's own blocks runs the four questions together; without sharing the same
    budget admits fewer at a time. Same tokens either way."""
    seen, tokens, shared, chunk_bytes = peak_run(llm, True, kv_tiers="host:none")
    seen_ref, _, _, _ = peak_run(llm, False, kv_tiers="host:none")
    L, cb, bs = llm.model_config.num_layers, GEOMETRY["chunk_blocks"], GEOMETRY["block_size"]
    whole = [s // bs // cb for s in shared]                       # whole chunks each question shares
    assert seen["running"] == seen_ref["running"] == 4
    assert seen_ref["used"] - seen["used"] == L * sum(whole) > 0      # held once
    assert seen_ref["reserved"] - seen["reserved"] == L * sum(whole)   # reserved once
    # a budget of exactly what sharing reserves: all four at once with sharing, fewer without
    tight = f"host:{seen['reserved'] * chunk_bytes}"
    seen_a, tok_a, _, _ = peak_run(llm, True, kv_tiers=tight)
    seen_b, tok_b, _, _ = peak_run(llm, False, kv_tiers=tight)
    assert seen_a["running"] == 4 > seen_b["running"]
    assert tok_a == tok_b == tokens == alone[0]


@pytest.mark.parametrize("placement", [None, "disk-in-process"])
def test_requests_that_end_at_their_first_token_share(llm, alone, placement):
    """Requests that finish in their own prefill step (one token each) still share: a finished
    sequence's blocks are kept until the next admission, so each question takes the document
    from the one before; nothing is left held at the end."""
    one = [SamplingParams(max_tokens=1, ignore_eos=True)] * len(QUESTIONS)
    eng = engine(llm, placement)
    try:
        tokens, logits, shared = run(eng, QUESTIONS, llm, one)
        assert shared == expected_shared(llm)
        assert tokens == [t[:1] for t in alone[0]]
        assert all((got[0] - ref[0]).abs().max().item() < 1e-4 for got, ref in zip(logits, alone[1]))
        assert not eng._finished and not eng.live.holders and eng.scheduler.kv_reserved == 0
        if placement is not None:
            assert all(t.used == 0 for t in eng.kv.tiers)
    finally:
        eng.kv.close()


def test_live_prefixes_index():
    live = LivePrefixes()
    live.add(5, [b"a", b"b"])
    live.add(5, [b"a", b"b", b"c"])
    live.add(7, [b"a"])
    assert live.longest([b"a", b"b", b"c", b"d"]) == (5, 3)
    assert live.longest([b"x"]) == (None, 0)
    live.remove(5)
    assert live.longest([b"a", b"b"]) == (7, 1)
    live.remove(7)
    assert not live.holders and not live.held


def test_generate_prefills_the_document_once(tiny_hf):
    """``LLM.generate`` with several questions about one document: the document is prefilled
    once (``prefill_tokens`` counts it once; each later question reports its shared tokens),
    greedy output identical to ``--no-prefix-sharing``; the report says what was shared."""
    _, path = tiny_hf("qwen2")
    kw = dict(dtype="float32", prefill_chunk=16, max_num_seqs=8, **GEOMETRY)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    on, off = LLM(path, **kw), LLM(path, prefix_sharing=False, **kw)
    a, b = on.generate(QUESTIONS, params), off.generate(QUESTIONS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    total = sum(len(o.prompt_token_ids) for o in a)
    assert [o.metrics.shared_tokens for o in a] == expected_shared(on)
    assert on.engine.prefill_tokens == total - sum(expected_shared(on)) and off.engine.prefill_tokens == total
    assert "prefix sharing:" in on.kv_report() and "prefix sharing:" not in (off.kv_report() or "")


@pytest.mark.parametrize("tiered", [False, True], ids=["memory", "host-disk"])
@pytest.mark.parametrize("extra", POLICY_CASES, ids=POLICY_IDS)
def test_sharing_with_policy_metadata(tiny_hf, tmp_path, extra, tiered):
    """A sparse policy's metadata (and the self-draft's) of a sharer is built from the shared
    blocks as from its own prefill: greedy tokens equal those without sharing. (Blocks of 8
    tokens: ShadowKV and retrieval score chunks of 8.)"""
    model, path = tiny_hf("qwen2")
    extra = with_calibration(extra, model.config, tmp_path)
    if tiered:
        extra = {**extra, "kv_tiers": "host:8KiB,disk:none", "disk_workers": 1}
    kw = dict(dtype="float32", prefill_chunk=16, block_size=8, chunk_blocks=2, **extra)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [o.token_ids for o in LLM(path, prefix_sharing=False, **kw).generate(QUESTIONS, params)]
    outs = LLM(path, **kw).generate(QUESTIONS, params)
    assert all(o.metrics.shared_tokens > 0 for o in outs[1:])
    assert [o.token_ids for o in outs] == ref


def test_sharing_and_the_store_together(tiny_hf, tmp_path):
    """With a persistent store too: the first question loads the document from the store, the
    others share it from the first (nothing read from disk twice, nothing written twice)."""
    _, path = tiny_hf("qwen2")
    kw = dict(dtype="float32", prefill_chunk=16, kv_store=str(tmp_path / "s"), kv_store_fsync="none", **GEOMETRY)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    LLM(path, **kw).generate(QUESTIONS[:1], params)
    b = LLM(path, **kw)
    outs = b.generate(QUESTIONS, params)
    ref = LLM(path, prefix_sharing=False, **{k: v for k, v in kw.items() if not k.startswith("kv_store")})
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref.generate(QUESTIONS, params)]
    assert outs[0].metrics.reused_tokens > 0 and outs[0].metrics.shared_tokens == 0
    assert all(o.metrics.shared_tokens > 0 for o in outs[1:])
    hits = b.engine.prefix.dir.counters.hits
    assert hits == outs[0].metrics.reused_tokens // GEOMETRY["block_size"] + sum(
        o.metrics.reused_tokens // GEOMETRY["block_size"] for o in outs[1:])


def test_abort_releases_shared_blocks(llm, tmp_path):
    """Sequences aborted while others share their blocks, or before they were admitted: every
    tier chunk, index entry, reservation and store pin is released; the engine then runs the
    questions as if nothing had happened."""
    eng = engine(llm, "disk-in-process", store=str(tmp_path / "s"))
    try:
        ids = [eng.add_request(llm.encode(q), p) for q, p in zip(QUESTIONS, PARAMS)]
        while sum(s.status is SeqStatus.DECODING for s in eng.seqs.values()) < 2:
            eng.step()
        assert eng.kv.store.placement.users and eng.prefix.dir.pinned
        eng.abort(ids[:1])                        # the source first: the sharer keeps its blocks
        eng.step()
        eng.abort(ids[1:])                        # the rest, one of them never admitted
        assert all(t.used == 0 for t in eng.kv.tiers) and not eng.kv.store.placement.users
        assert not eng.live.holders and not eng.scheduler.key_refs and eng.scheduler.kv_reserved == 0
        assert not eng.prefix.dir.pinned and not eng._pinned
    finally:
        eng.kv.close()
