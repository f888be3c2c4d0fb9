"""Engine behaviour on tiny random models: batching, sampling, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.errors import ConfigError, InputError

PROMPTS = ["hello there", "a much longer prompt that spans several prefill chunks of the engine", "x",
           "mid-sized prompt text"]


@pytest.fixture(scope="module")
def llm(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=8, max_num_seqs=4)


def test_batched_ragged_decode_equals_one_at_a_time(llm):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = llm.generate(PROMPTS, params)
    single = [llm.generate(p, params)[0] for p in PROMPTS]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids and len(b.token_ids) == 12


def test_batched_logits_equal_single(llm):
    """Decode rows of a ragged batch see exactly their own KV (logits, not just argmax)."""
    from kvoffload.model.interface import ForwardBatch, Logits, Phase

    eng = llm.engine
    ids = [llm.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        for i, p in enumerate(ids):
            eng.kv.allocate(100 + i, len(p) + 1)
            eng.model(torch.tensor([p]), ForwardBatch(Phase.PREFILL, (100 + i,), torch.arange(len(p))[None],
                                                      (0,), Logits.NONE), eng.kv)
        starts = tuple(len(p) for p in ids)
        nxt = torch.tensor([[7]] * len(ids))
        batch = ForwardBatch(Phase.DECODE, tuple(100 + i for i in range(len(ids))),
                             torch.tensor(starts)[:, None], starts)
        together = eng.model(nxt, batch, eng.kv)
    for i, p in enumerate(ids):
        eng.kv.free(100 + i)
        ref = eng.prompt_logits(p + [7])[-1]
        diff = (together[i] - ref).abs().max().item()
        assert diff < 1e-4, f"row {i}: max diff {diff}"


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], p)
    b = llm.generate(PROMPTS[:2], p)
    c = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.9, seed=99, max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # the same seeded request gives the same tokens alone or inside a batch
    alone = llm.generate(PROMPTS[1], p)[0]
    assert alone.token_ids == a[1].token_ids


def test_stream_equals_generate(llm):
    p = SamplingParams(max_tokens=20, ignore_eos=True)
    streamed = "".join(llm.stream(PROMPTS[0], p))
    assert streamed == llm.last_output.text == llm.generate(PROMPTS[0], p)[0].text


def test_stop_string_truncates_and_finishes(llm):
    p = SamplingParams(max_tokens=40, ignore_eos=True)
    full = llm.generate(PROMPTS[0], p)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    first = full.text.find(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:first]
    streamed = "".join(llm.stream(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))))
    assert streamed == out.text


def test_timings_are_reported(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    m = out.metrics
    assert m.prompt_tokens == len(out.prompt_token_ids) and m.generated_tokens == 5
    assert m.prefill_s > 0 and m.decode_s > 0 and m.prefill_tok_s > 0 and m.decode_tok_s > 0


def test_prompt_longer_than_context_is_rejected(llm):
    with pytest.raises(InputError, match="context"):
        llm.generate([1] * llm.model_config.max_position, SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished()


def test_generation_stops_at_context_end(llm):
    n = llm.model_config.max_position
    out = llm.generate([5] * (n - 3), SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(max_tokens=0), dict(temperature=float("nan")), dict(stop=("",))])
def test_invalid_sampling_values(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_auto_dtype_and_quantization_resolution(tiny_gguf):
    from kvoffload.model.loading import read_checkpoint, resolve_quantization

    _, path = tiny_gguf("qwen2")
    ckpt = read_checkpoint(path, torch.float32)
    assert ckpt.weight_type == "F32"
    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu, "bfloat16", "F32") == "none"
    assert resolve_quantization("auto", cpu, "bfloat16", "Q4_1") == "int4"
    assert resolve_quantization("auto", cpu, "bfloat16", "Q4_K") == "int4"
    for wt in ("Q5_0", "Q5_1", "Q6_K", "Q8_0"):                               # 4 bits would lose: int8
        assert resolve_quantization("auto", cpu, "bfloat16", wt) == "int8"
    assert resolve_quantization("auto", cpu, "float32", "Q4_1") == "none"   # PyTorch's int kernels want bf16
    assert resolve_quantization("auto", cpu, "float32", "Q4_1", fused=True) == "int4"   # the fused layer: fp32 too
    assert resolve_quantization("auto", cpu, "float32", "Q5_0", fused=True) == "int8"
    assert resolve_quantization("auto", cpu, "float32", "F32", fused=True) == "none"
    assert resolve_quantization("auto", torch.device("cuda"), "bfloat16", "Q4_1") == "none"
    assert resolve_quantization("int8", cpu, "float32", "F32") == "int8"


@pytest.mark.parametrize("policy", ["prefill-first", "interleave"])
def test_scheduling_policies_give_the_same_tokens(tiny_hf, policy):
    from kvoffload.engine.scheduler import Scheduler
    from kvoffload.engine.sequence import Sequence

    _, path = tiny_hf("qwen2")
    llm = LLM(path, dtype="float32", prefill_chunk=8, max_num_seqs=4, scheduling=policy)
    ref = LLM(path, dtype="float32", prefill_chunk=8, max_num_seqs=1)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == \
        [ref.generate(p, params)[0].token_ids for p in PROMPTS]
    # the plans: with prefill-first no decode runs while a prompt chunk is scheduled
    sch = Scheduler(4, 8, prefill_first=(policy == "prefill-first"))
    seqs = [Sequence(i, [1] * 20, params, 26, frozenset(), None, None) for i in range(2)]
    sch.add(seqs[0])
    plan, _ = sch.schedule()
    seqs[0].num_cached = 20
    from kvoffload.engine.sequence import SeqStatus
    seqs[0].status = SeqStatus.DECODING
    sch.add(seqs[1])
    plan, _ = sch.schedule()
    assert plan.prefill is not None and plan.decode == (() if policy == "prefill-first" else (0,))


def test_kv_budget_admission_waits_instead_of_overflowing(tiny_hf):
    """Tier budgets that hold one sequence's KV (and a bit): eight requests queue and are admitted
    as room frees (never a KVBudgetExceeded mid-step); a request that can never fit is a one-line error."""
    _, path = tiny_hf("qwen2")
    ref = LLM(path, dtype="float32", prefill_chunk=8, max_num_seqs=8)
    # qwen2 tiny: 3 layers x 2 KV heads x 16 dims, fp32: a 16-block chunk is 64 KiB; 40 tokens = 1 chunk/layer
    llm = LLM(path, dtype="float32", prefill_chunk=8, max_num_seqs=8, kv_tiers="host:320KiB")
    try:
        eng = llm.engine
        assert eng.kv_chunk_limit == 5 and eng.kv_chunks(40) == 3 and eng.kv_chunks(300) == 6
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        prompts = [f"prompt {i}" for i in range(8)]
        peak = 0
        step = eng.step

        def watched():
            nonlocal peak
            out = step()
            peak = max(peak, eng.scheduler.kv_reserved)
            assert len(eng.scheduler.running) <= 1
            return out

        eng.step = watched
        outs = llm.generate(prompts, params)
        assert peak == 3 and eng.scheduler.kv_reserved == 0
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref.generate(prompts, params)]
        with pytest.raises(InputError, match="KV chunks"):
            llm.generate("x", SamplingParams(max_tokens=299, ignore_eos=True))
    finally:
        llm.close()
        ref.close()


def test_prompt_and_token_logprobs(llm):
    ids = llm.encode(PROMPTS[1])
    out = llm.generate(ids, SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1))[0]
    ref = torch.log_softmax(llm.engine.prompt_logits(ids + out.token_ids).float(), -1)      # [T, V]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i, e in enumerate(out.prompt_logprobs[1:], 1):          # across prefill chunks of 8
        assert e.token == ids[i] and e.logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert len(e.top) == 1 and e.top[0][1] == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    for j, e in enumerate(out.logprobs):
        row = ref[len(ids) - 1 + j]
        assert e.token == out.token_ids[j] == int(row.argmax())
        assert e.logprob == pytest.approx(float(row.max()), abs=1e-4) and len(e.top) == 2


def test_repetition_penalties_change_greedy_output(llm):
    base = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = llm.generate("x", base)[0].token_ids
    assert len(set(plain)) < len(plain)                    # the tiny random model repeats itself
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repeat_penalty": 5.0}):
        pen = llm.generate("x", SamplingParams(max_tokens=24, ignore_eos=True, **kw))[0].token_ids
        assert pen != plain and len(set(pen)) > len(set(plain)), kw


def test_step_until_prefilled_stops_with_every_prompt_cached(llm):
    """It steps while a sequence waits or prefills (prompts over several chunks, more sequences than
    a step prefills), then stops before decoding on: the decode measurements' untimed part."""
    from kvoffload.engine.sequence import SeqStatus

    eng = llm.engine
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    sids = [eng.add_request(llm.encode(p), params) for p in PROMPTS]
    eng.step_until_prefilled(sids)
    assert all(eng.seqs[s].status not in (SeqStatus.WAITING, SeqStatus.PREFILLING) for s in sids)
    assert sum(len(eng.seqs[s].output_ids) for s in sids) < 5 * len(sids)       # decoding left to do
    while eng.has_unfinished():
        eng.step()
    assert [eng.pop_finished(s).output_ids for s in sids] == [o.token_ids for o in llm.generate(PROMPTS, params)]
