"""Tiered KV store: every placement of chunks over the registered tiers gives the logits of the
all-in-memory run — bit for bit, in fp32 and bf16 — and identical greedy outputs; budgets hold."""

from __future__ import annotations

import os

import pytest
import torch
from placements import GEOMETRY, PLACEMENTS, forced_logits

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.attention.tiered import TieredBackend
from kvoffload.config import KVConfig
from kvoffload.engine.engine import Engine

PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello", "a medium prompt for the tiers", "xyz " * 9]


@pytest.fixture(scope="module")
def dense(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY)


def tiered_engine(llm: LLM, native: bool = True, kv_dtype: torch.dtype = torch.float32, **kv) -> Engine:
    kvcfg = KVConfig(**{**GEOMETRY, **kv})
    backend = TieredBackend(llm.model_config, kvcfg, llm.device, kv_dtype, llm.engine.kv.kv_dtype, 2, native=native)
    return Engine(llm.model, backend, llm.tokenizer, llm.config.replace(kv=kvcfg), llm.device)


def decode_with_fault(llm: LLM, params, fault, **kv) -> tuple[list[list[int]], list[list[int]], object]:
    """PROMPTS generated in memory (the reference) and through a disk-tiered engine whose step
    loop calls ``fault(steps, disk_tier)`` after every step: (reference, got, the disk tier)."""
    ref = [o.token_ids for o in llm.generate(PROMPTS, params)]
    eng = tiered_engine(llm, kv_tiers="disk:none", **kv)
    tier = eng.kv.tiers[0]
    try:
        ids = [eng.add_request(llm.encode(p), params) for p in PROMPTS]
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            fault(steps, tier)
        return ref, [eng.pop_finished(i).output_ids for i in ids], tier
    finally:
        eng.kv.close()


def report(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got - ref).abs()
    print(f"{name}: max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
    return diff.max().item()


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placement_logits_equal_dense(dense, name):
    """Bit for bit (fp32) against the contiguous in-memory backend; reads land where the chunks are;
    each memory tier stays within its budget (measured)."""
    ids = dense.encode(PROMPTS[0])[:70]
    ref = forced_logits(dense.engine, ids, 37)
    eng = tiered_engine(dense, **PLACEMENTS[name])
    try:
        got = forced_logits(eng, ids, 37)
        st = eng.kv.stats()
        print("bytes read: " + ", ".join(f"{t} {c.read}" for t, c in st.tiers.items()))
        report(name, got, ref)
        assert torch.equal(got, ref)
        tiers = [t for t in st.tiers if t != "tails"]
        if name.startswith("all-"):
            assert tiers == [name[4:]] and st.tiers[name[4:]].read > 0
        else:
            assert all(st.tiers[t].read > 0 for t in tiers), st.tiers
        for t in eng.kv.tiers:
            assert t.budget is None or t.bytes_held() <= t.budget, (t.name, t.bytes_held(), t.budget)
    finally:
        eng.kv.close()


@pytest.mark.ray                     # every placement, the ray tier's too
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_half_precision_bit_identical_across_placements(tiny_hf, kv_dtype):
    """16-bit activations and KV (the default numerics on a bf16 CPU): every placement decodes to
    the same logits bit for bit, prefill included (3 prompt chunks: later chunks attend their
    prefix read back from the tiers)."""
    _, path = tiny_hf("qwen2")
    llm = LLM(path, dtype=kv_dtype, prefill_chunk=16, **GEOMETRY)
    ids = llm.encode(PROMPTS[0])[:80]
    ref = forced_logits(llm.engine, ids, 41)
    dt = getattr(torch, kv_dtype)
    for name, kv in PLACEMENTS.items():
        eng = tiered_engine(llm, kv_dtype=dt, **kv)
        try:
            got = forced_logits(eng, ids, 41)
            report(f"{kv_dtype} {name}", got, ref)
            assert torch.equal(got, ref), name
        finally:
            eng.kv.close()


@pytest.mark.ray                     # "mixed" holds every tier, the ray tier's too
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_placement_greedy_batch_identical(tiny_hf, dtype):
    """Whole runs (4 ragged prompts decoded together): the same tokens in every placement."""
    _, path = tiny_hf("qwen2")
    llm = LLM(path, dtype=dtype, prefill_chunk=16, max_num_seqs=4, **GEOMETRY)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(PROMPTS, params)]
    for name in ("mixed", "disk-3-workers", "all-latency-host"):
        eng = tiered_engine(llm, kv_dtype=getattr(torch, dtype), **PLACEMENTS[name])
        try:
            ids = [eng.add_request(llm.encode(p), params) for p in PROMPTS]
            while eng.has_unfinished():
                eng.step()
            assert [eng.pop_finished(i).output_ids for i in ids] == ref, name
            assert all(t.used == 0 for t in eng.kv.tiers)                   # every chunk released
        finally:
            eng.kv.close()


@pytest.mark.ray                     # "mixed" holds every tier, the ray tier's too
def test_torch_path_equals_native(dense):
    """The PyTorch reference (CUDA, or no compiler) against the native paged kernel."""
    ids = dense.encode(PROMPTS[0])[:50]
    a_eng = tiered_engine(dense, **PLACEMENTS["mixed"])
    b_eng = tiered_engine(dense, native=False, **PLACEMENTS["mixed"])
    try:
        a, b = forced_logits(a_eng, ids, 21), forced_logits(b_eng, ids, 21)
        assert report("native vs torch", a, b) < 1e-4
    finally:
        a_eng.kv.close()
        b_eng.kv.close()


def test_offload_dir_removed_on_close(dense, tmp_path):
    eng = tiered_engine(dense, kv_tiers="disk:none", offload_dir=str(tmp_path))
    forced_logits(eng, dense.encode(PROMPTS[0])[:40], 20)
    assert len(os.listdir(tmp_path)) == 1
    eng.kv.close()
    assert os.listdir(tmp_path) == []


def test_decode_microbatches_identical(dense):
    """Two decode micro-batches in threads (overlapping worker waits) give the same tokens."""
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ref = [o.token_ids for o in dense.generate(PROMPTS, params)]
    eng = tiered_engine(dense, **PLACEMENTS["disk-3-workers"])
    eng.config = eng.config.replace(decode_microbatches=2)
    try:
        ids = [eng.add_request(dense.encode(p), params) for p in PROMPTS]
        while eng.has_unfinished():
            eng.step()
        assert [eng.pop_finished(i).output_ids for i in ids] == ref
        assert eng._pool is not None
    finally:
        eng.kv.close()


def test_kv_tiers_flag_and_shorthands_agree():
    """``--kv-host-budget`` is a shorthand for a tier list; both spell the same tiers."""
    a = KVConfig(kv_host_budget="64MiB")
    b = KVConfig(kv_tiers="device:0,host:64MiB,disk:none")
    assert a.tier_list("cpu") == b.tier_list("cpu")
    assert KVConfig(kv_host_budget="64MiB").tier_list("cuda")[0] == ("device", None)
