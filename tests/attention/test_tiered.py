"""Tiered KV store: every placement of blocks over device / host / disk workers gives the
logits of the all-in-memory run (fp32 tolerance) and identical greedy outputs."""

from __future__ import annotations

import os

import pytest
import torch

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.attention.tiered import TieredBackend
from kvoffload.config import KVConfig
from kvoffload.engine.engine import Engine
from kvoffload.model.interface import ForwardBatch, Logits, Phase

PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello", "a medium prompt for the tiers", "xyz " * 9]

# tiny blocks and budgets so blocks spill within a few tokens (slot: 2 x 2 heads x 16 dims x 4 tokens x fp32 = 1 KiB)
PLACEMENTS = {
    "all-device": dict(kv_device_budget="1GiB"),
    "all-host": dict(kv_host_budget="1GiB"),
    "all-disk": dict(kv_host_budget=0, disk_workers=1),
    "mixed": dict(kv_device_budget="3KiB", kv_host_budget="6KiB", kv_sink_tokens=4, kv_recent_tokens=8),
    "disk-3-workers": dict(kv_host_budget="2KiB", disk_workers=3, kv_recent_tokens=0, kv_sink_tokens=0),
}


@pytest.fixture(scope="module")
def dense(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=16, max_num_seqs=4)


def tiered_engine(llm: LLM, native: bool = True, **kv) -> Engine:
    kvcfg = KVConfig(block_size=4, **kv)
    backend = TieredBackend(llm.model_config, kvcfg, llm.device, torch.float32, torch.float32, 2, native=native)
    return Engine(llm.model, backend, llm.tokenizer, llm.config.replace(kv=kvcfg), llm.device)


def forced_logits(engine: Engine, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill ids[:prompt_len] in chunks, then decode the rest one token per step: ``[T, V]``."""
    rows = []
    sid = 10_000
    kv = engine.kv
    kv.allocate(sid, len(ids))
    with torch.inference_mode():
        chunk = engine.config.prefill_chunk
        for s in range(0, prompt_len, chunk):
            e = min(s + chunk, prompt_len)
            batch = ForwardBatch(Phase.PREFILL, (sid,), torch.arange(s, e)[None], (s,), Logits.ALL)
            rows.append(engine.model(torch.tensor([ids[s:e]]), batch, kv)[0])
        for p in range(prompt_len, len(ids)):
            batch = ForwardBatch(Phase.DECODE, (sid,), torch.tensor([[p]]), (p,))
            rows.append(engine.model(torch.tensor([[ids[p]]]), batch, kv))
    kv.free(sid)
    return torch.cat(rows)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_placement_logits_equal_dense(dense, name):
    ids = dense.encode(PROMPTS[0])[:70]
    ref = forced_logits(dense.engine, ids, 37)
    eng = tiered_engine(dense, **PLACEMENTS[name])
    try:
        got = forced_logits(eng, ids, 37)
        tiers = eng.kv.stats.tiers
        diff = (got - ref).abs()
        print(f"{name}: max {diff.max().item():.2e} mean {diff.mean().item():.2e}; bytes read "
              + ", ".join(f"{t} {c.read}" for t, c in tiers.items()))
        assert diff.max().item() < 1e-4
        if name == "all-disk" or name.startswith("disk"):
            assert tiers["disk"].read > 0
        if name == "all-host":
            assert tiers["host"].read > 0 and tiers["disk"].read == 0
        if name == "mixed":
            assert all(c.read > 0 for c in tiers.values())
        held, cfg = eng.kv.memory_held(), eng.kv.kvcfg          # budgets hold, measured
        for tier, budget in (("device", cfg.kv_device_budget), ("host", cfg.kv_host_budget)):
            assert budget is None or held[tier] <= budget, (tier, held[tier], budget)
    finally:
        eng.kv.close()


@pytest.mark.parametrize("name", ["mixed", "disk-3-workers"])
def test_placement_greedy_batch_identical(dense, name):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in dense.generate(PROMPTS, params)]
    eng = tiered_engine(dense, **PLACEMENTS[name])
    try:
        ids = [eng.add_request(dense.encode(p), params) for p in PROMPTS]
        while eng.has_unfinished():
            eng.step()
        got = [eng.pop_finished(i).output_ids for i in ids]
        assert got == ref
        assert eng.kv.blocks_per_tier()["device"] == 0 if name != "mixed" else True
    finally:
        eng.kv.close()


def test_torch_path_equals_native(dense):
    """The gather + SDPA path (CUDA, or no compiler) against the native paged kernel."""
    ids = dense.encode(PROMPTS[0])[:50]
    a_eng = tiered_engine(dense, **PLACEMENTS["mixed"])
    b_eng = tiered_engine(dense, native=False, **PLACEMENTS["mixed"])
    try:
        a, b = forced_logits(a_eng, ids, 21), forced_logits(b_eng, ids, 21)
        assert (a - b).abs().max().item() < 1e-4
    finally:
        a_eng.kv.close()
        b_eng.kv.close()


def test_offload_dir_removed_on_close(dense, tmp_path):
    eng = tiered_engine(dense, kv_host_budget=0, offload_dir=str(tmp_path))
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


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_half_precision_kv_matches_dense_same_dtype(tiny_hf, kv_dtype):
    """16-bit KV over every tier (native kernels, disk workers) against the in-memory backend
    storing the same 16-bit KV: only summation order differs."""
    _, path = tiny_hf("qwen2")
    llm = LLM(path, dtype="float32", kv_dtype=kv_dtype, prefill_chunk=16)
    ids = llm.encode(PROMPTS[0])[:60]
    ref = forced_logits(llm.engine, ids, 29)
    kvcfg = KVConfig(block_size=4, **PLACEMENTS["mixed"])
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[kv_dtype]
    backend = TieredBackend(llm.model_config, kvcfg, llm.device, dt, torch.float32, 2)
    eng = Engine(llm.model, backend, llm.tokenizer, llm.config.replace(kv=kvcfg), llm.device)
    try:
        got = forced_logits(eng, ids, 29)
        diff = (got - ref).abs()
        print(f"{kv_dtype}: max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
        assert diff.max().item() < 1e-4
    finally:
        backend.close()
