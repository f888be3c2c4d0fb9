"""Compressed KV blocks (``--kv-dtype int8 / int4``): the block format's round trip within its
quantisation bounds, attention over compressed blocks against full-precision KV (errors
reported), every placement of compressed blocks bit-identical to all-in-RAM, ``gather``
dequantised, and bad combinations refused at start."""

from __future__ import annotations

import pytest
import torch
from placements import GEOMETRY, PLACEMENTS, forced_logits
from test_cli import assert_one_line_error, kvo

from kvoffload.api import LLM
from kvoffload.attention.tiered import TieredBackend
from kvoffload.config import EngineConfig, KVConfig
from kvoffload.dtypes import QUANT
from kvoffload.engine.engine import Engine
from kvoffload.errors import ConfigError
from kvoffload.kv.layout import BlockLayout

PROMPT = "the quick brown fox jumps over the lazy dog " * 3


def report(name: str, got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.float() - ref.float()).abs()
    mx, mean = diff.max().item(), diff.mean().item()
    print(f"{name}: max {mx:.3e} mean {mean:.3e}")
    return mx, mean


def quant_engine(llm: LLM, stored: str, native: bool = True, **kv) -> Engine:
    kvcfg = KVConfig(**{**GEOMETRY, **kv})
    be = TieredBackend(llm.model_config, kvcfg, llm.device, llm.engine.kv.kv_dtype, llm.engine.kv.kv_dtype, 2,
                       native=native, stored=stored)
    return Engine(llm.model, be, llm.tokenizer, llm.config.replace(kv=kvcfg, kv_dtype=stored), llm.device)


@pytest.mark.parametrize("stored", list(QUANT))
@pytest.mark.parametrize("group", [0, 8])
def test_block_round_trip_within_quantisation_bounds(stored, group):
    """Every value decodes within half a step of its group (plus the fp16 rounding of the
    group's minimum); keys with an outlier channel stay accurate in the others (per-channel
    groups); numpy and torch decode the same bits."""
    lay = BlockLayout(16, 3, 32, stored, 4, group)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 64, 32, generator=g), torch.randn(3, 64, 32, generator=g)
    k[:, :, 5] *= 30                                                       # an outlier channel
    slots = lay.pack(k, v)
    assert slots.dtype == torch.uint8 and tuple(slots.shape) == (4, lay.slot_bytes)
    K, V = lay.unpack(slots)
    qmax = (1 << QUANT[stored].bits) - 1
    kk = k.reshape(3, 4, 16, 32)
    k_step = (kk.amax(2) - kk.amin(2)) / qmax                              # [H, n, D]: per channel and block
    k_bound = (k_step / 2 + kk.abs().amax(2) / 1024 + 1e-6)[:, :, None]
    assert ((K - k).reshape(3, 4, 16, 32).abs() <= k_bound).all()
    vg = lay.vgroup
    vv = v.reshape(3, 64, 32 // vg, vg)
    v_bound = ((vv.amax(-1) - vv.amin(-1)) / qmax / 2 + vv.abs().amax(-1) / 1024 + 1e-6)[..., None]
    assert ((V - v).reshape(3, 64, 32 // vg, vg).abs() <= v_bound).all()
    others = [c for c in range(32) if c != 5]
    report(f"{stored} g{group} K (outlier channel excluded)", K[:, :, others], k[:, :, others])
    report(f"{stored} g{group} V", V, v)
    Kn, Vn = lay.unpack_blocks(slots.numpy())
    Kt, Vt = lay.unpack_blocks(slots)
    assert (Kn == Kt.numpy()).all() and (Vn == Vt.numpy()).all()


def test_layout_sizes():
    """int8 halves and int4 quarters a bf16 block, scales included (SmolLM2's geometry)."""
    bf = BlockLayout(16, 3, 64, "bfloat16")
    i8, i4 = BlockLayout(16, 3, 64, "int8"), BlockLayout(16, 3, 64, "int4")
    print(f"slot bytes: bf16 {bf.slot_bytes} int8 {i8.slot_bytes} int4 {i4.slot_bytes}")
    assert bf.slot_bytes / i8.slot_bytes > 1.7 and bf.slot_bytes / i4.slot_bytes > 3.0
    assert i4.disk_stride == 4096 and bf.disk_stride == 3 * 4096
    assert i8.disk_stride == 7168                     # O_DIRECT-aligned, not padded to 2 pages


@pytest.mark.parametrize("bad, msg", [
    (dict(kv_dtype="int8", kv_group_size=24), "must divide the head dimension"),
    (dict(kv_dtype="int4", block_size=5), "must be even"),
    (dict(kv_dtype="float32", kv_group_size=8), "applies to a compressed KV"),
    (dict(kv_dtype="int3"), "kv_dtype must be one of"),
])
def test_bad_combinations_fail_at_start(tiny_hf, bad, msg):
    """A combination the format cannot hold is a one-line ConfigError from the preflight (before
    the model loads)."""
    from kvoffload.preflight import preflight

    _, path = tiny_hf("qwen2")
    with pytest.raises(ConfigError, match=msg) as e:
        cfg = EngineConfig(model=path, dtype="float32").replace(**bad)
        preflight(cfg, "cpu", "float32")
    assert "\n" not in str(e.value)


def test_bad_group_is_one_line_cli_error(tiny_hf):
    _, path = tiny_hf("qwen2")
    r = kvo("generate", "-m", path, "--dtype", "float32", "--kv-dtype", "int8", "--kv-group-size", "3", "-n", "2",
            "--prompt", "hello")
    assert_one_line_error(r, "--kv-group-size 3 must divide")


@pytest.fixture(scope="module")
def llm(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY)


# logits error of attention over compressed blocks against fp32 KV (the tiny random model, logits
# within +-4.6): measured max / mean int8 0.032 / 0.0031, int4 0.66 / 0.068; bounds with headroom
LOGIT_BOUND = {"int8": (0.05, 0.01), "int4": (1.0, 0.15)}


@pytest.mark.parametrize("stored", list(QUANT))
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_attention_over_compressed_blocks_vs_full_precision(llm, stored, native):
    """Logits of a prefill (3 chunks: later ones attend the compressed prefix) and 30 decode
    steps over int8 / int4 blocks against fp32 KV: within the bounds (max and mean reported)."""
    ids = llm.encode(PROMPT)[:70]
    ref = forced_logits(llm.engine, ids, 37)
    eng = quant_engine(llm, stored, native=native, kv_tiers="host:none")
    try:
        got = forced_logits(eng, ids, 37)
    finally:
        eng.kv.close()
    mx, mean = report(f"{stored} logits vs fp32 KV ({'native' if native else 'torch'})", got, ref)
    print(f"  logits span {ref.abs().max().item():.1f}")
    assert mx <= LOGIT_BOUND[stored][0] and mean <= LOGIT_BOUND[stored][1]
    assert mx > 0                                                            # it was compressed


@pytest.mark.ray                     # every placement, the ray tier's too
@pytest.mark.parametrize("stored", list(QUANT))
def test_every_placement_bit_identical(llm, stored):
    """Compressed blocks over every placement (each tier alone, spilled through all, several disk
    workers, the disk read in-process) decode to the logits of all-in-RAM, bit for bit: every
    tier's worker runs the same native kernel over the same bytes."""
    from kvoffload.kernels.paged import PagedAttention

    if PagedAttention.for_layout(BlockLayout(4, 2, 16, stored), 2) is None:
        pytest.skip("no native kernel")
    ids = llm.encode(PROMPT)[:70]
    ref = None
    for name, kv in {"all-host": PLACEMENTS["all-host"], **PLACEMENTS}.items():
        eng = quant_engine(llm, stored, **kv)
        try:
            got = forced_logits(eng, ids, 37)
            st = eng.kv.stats()
        finally:
            eng.kv.close()
        if ref is None:
            ref = got
        report(f"{stored} {name}", got, ref)
        assert torch.equal(got, ref), name
        if name.startswith("all-"):
            assert st.tiers[name[4:]].read > 0, st.tiers


def test_gather_dequantised_and_tail_full_precision(llm):
    """``kv.gather`` returns dequantised values in the compute dtype, within the format's error
    of the fp32 store's; the partly filled tail block is the exact full-precision k/v."""
    ids = llm.encode(PROMPT)[:22]                                           # 5 full blocks of 4, a tail of 2
    stores = {}
    for stored in (None, "int8"):
        eng = quant_engine(llm, stored, kv_tiers="host:none") if stored else None
        be = eng.kv if eng else llm.engine.kv
        forced_logits_keep(eng or llm.engine, ids)
        idx = torch.arange(len(ids)).expand(3, 2, -1)                       # [layers, H_kv, n]
        stores[stored] = be.gather(10_001, idx)
        be.free(10_001)
        if eng:
            eng.kv.close()
    (K, V), (K8, V8) = stores[None], stores["int8"]
    assert K8.dtype == K.dtype == torch.float32
    report("gather int8 K", K8[:, :, :20], K[:, :, :20])
    report("gather int8 V", V8[:, :, :20], V[:, :, :20])
    assert torch.equal(K8[:, :, 20:], K[:, :, 20:]) and torch.equal(V8[:, :, 20:], V[:, :, 20:])
    assert not torch.equal(K8[:, :, :20], K[:, :, :20])
    assert torch.allclose(K8, K, atol=0.05 * K.abs().max().item()) and torch.allclose(V8, V, atol=0.05 * V.abs().max().item())


def forced_logits_keep(engine: Engine, ids: list[int]) -> None:
    """Prefill ids as sequence 10001 and keep its KV."""
    from kvoffload.model.interface import ForwardBatch, Logits, Phase

    engine.kv.allocate(10_001, len(ids))
    with torch.inference_mode():
        batch = ForwardBatch(Phase.PREFILL, (10_001,), torch.arange(len(ids))[None], (0,), Logits.LAST)
        engine.model(torch.tensor([ids]), batch, engine.kv)


def test_sparse_policy_over_compressed_blocks(tiny_hf):
    """Quest over int8 blocks: its metadata is built from the full-precision keys at write time
    (the same bounds as over fp32 KV); at full budget it equals dense attention over the same
    int8 blocks; at 1/4 with the blocks spilled to disk it equals the all-in-RAM int8 run bit
    for bit (token masks in the compressed kernel)."""
    _, path = tiny_hf("qwen2")
    kw = dict(dtype="float32", prefill_chunk=32, block_size=8, chunk_blocks=2, sparse_policy="quest",
              sparse_dense_layers="none")
    text = PROMPT * 4
    runs = {}
    for name, extra in {"fp32": {}, "int8": dict(kv_dtype="int8")}.items():
        llm = LLM(path, sparse_budget="1/4", **kw, **extra)
        ids = llm.encode(text)[:150]
        forced_logits_keep(llm.engine, ids)
        runs[name] = [(s.kmin.clone(), s.kmax.clone()) for s in llm.engine.kv.policy.states[10_001]]
        llm.close()
    for (a0, a1), (b0, b1) in zip(runs["fp32"], runs["int8"]):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    dense8 = LLM(path, dtype="float32", prefill_chunk=32, block_size=8, chunk_blocks=2, kv_dtype="int8")
    full8 = LLM(path, sparse_budget="all", kv_dtype="int8", **kw)
    quarter_mem = LLM(path, sparse_budget="1/4", kv_dtype="int8", **kw)
    quarter_disk = LLM(path, sparse_budget="1/4", kv_dtype="int8", kv_host_budget="4KiB", disk_workers=1,
                       kv_recent_tokens=16, kv_sink_tokens=0, **kw)
    try:
        ref = dense8.engine.teacher_forced_logits(ids, 60)
        got = full8.engine.teacher_forced_logits(ids, 60)
        assert report("quest int8 at full budget vs dense int8", got, ref)[0] < 1e-4
        a = quarter_mem.engine.teacher_forced_logits(ids, 60)
        b = quarter_disk.engine.teacher_forced_logits(ids, 60)
        report("quest int8 1/4: disk vs RAM", b, a)
        assert torch.equal(a, b)
        assert quarter_disk.engine.kv.stats().tiers["disk"].read > 0
    finally:
        for x in (dense8, full8, quarter_mem, quarter_disk):
            x.close()


def test_speculation_over_compressed_blocks(tiny_hf):
    """Self-speculation with int8 blocks: the draft cache stays in the compute dtype, and greedy
    output equals plain decoding over the same int8 blocks."""
    from kvoffload import SamplingParams

    _, path = tiny_hf("qwen2")
    opts = dict(dtype="float32", prefill_chunk=16, max_num_seqs=4, block_size=4, kv_dtype="int8")
    plain = LLM(path, **opts)
    spec = LLM(path, speculate="self", num_speculative_tokens=3, spec_draft_budget=16, spec_draft_share="1/2",
               spec_draft_window=8, sparse_chunk=4, **opts)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [PROMPT, "hello", "a medium prompt for the tiers"]
    try:
        ref = [o.token_ids for o in plain.generate(prompts, params)]
        got = [o.token_ids for o in spec.generate(prompts, params)]
        st = spec.engine.spec.stats
        print(st.line())
        assert got == ref
        assert st.accepted > 0
        assert spec.engine.kv.layout.dtype == "int8"
        assert spec.engine.spec.draft.store.layout.dtype == "float32"          # the draft cache: compute dtype
    finally:
        plain.close()
        spec.close()


def test_sweep_refuses_compressed_kv(tiny_hf):
    _, path = tiny_hf("qwen2")
    r = kvo("sweep", "agreement", "-m", path, "--dtype", "float32", "--kv-dtype", "int4", "-L", "1k")
    assert_one_line_error(r, "--kv-dtype int4 is not supported")
