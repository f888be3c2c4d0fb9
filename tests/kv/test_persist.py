"""The persistent KV store: prompt prefixes reused across engines (as across processes) give the
logits of a fresh prefill (fp32 tolerance) and identical greedy tokens in every placement; the
store is managed (budget, LRU, index rebuilt, atomic writes) and never trusted when damaged."""

from __future__ import annotations

import errno
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
from kvoffload.errors import KvoffloadError
from kvoffload.kv.persist import store as store_mod
from kvoffload.kv.persist.prefix import PrefixStore
from kvoffload.kv.persist.store import BlockDir, StoreError

DOC = "the quick brown fox jumps over the lazy dog while the cat sleeps " * 3
QUESTIONS = [DOC + "question one?", DOC + "and a second, longer question about it?"]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
FP = "tiny-test-model"


@pytest.fixture(scope="module")
def dense(tiny_hf):
    _, path = tiny_hf("qwen2")
    return LLM(path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY)


def engine(llm: LLM, store: str | None, placement: str | None, fingerprint: str = FP, budget=None,
           **kv) -> Engine:
    """An engine over ``llm``'s model: the in-memory backend (``placement`` None) or a tiered one,
    with a fresh view of the store directory ``store`` (its index rebuilt: a new process's);
    without prefix sharing between live sequences (tests/kv/test_sharing.py), so that every
    prefix reused here comes from the store."""
    if placement is None:
        backend = DenseBackend(llm.model_config, llm.device, torch.float32, block_size=GEOMETRY["block_size"],
                               chunk_blocks=GEOMETRY["chunk_blocks"])
        kvcfg = KVConfig(**GEOMETRY, prefix_sharing=False)
    else:
        kvcfg = KVConfig(**{**GEOMETRY, **PLACEMENTS[placement], "prefix_sharing": False, **kv})
        backend = TieredBackend(llm.model_config, kvcfg, llm.device, torch.float32, torch.float32, 2)
    prefix = None
    if store is not None:
        prefix = PrefixStore(BlockDir(store, budget, fsync="none"), fingerprint, backend.layout, llm.model_config.num_layers)
    return Engine(llm.model, backend, llm.tokenizer, llm.config.replace(kv=kvcfg), llm.device, prefix)


def run(eng: Engine, prompts: list[str], llm: LLM) -> tuple[list[list[int]], list[torch.Tensor], list[int]]:
    """Greedy tokens, the logits each was sampled from (``[steps, V]`` per prompt) and the prompt
    tokens reused from the store, per prompt (one engine step at a time)."""
    seqs, logits = step_all(eng, [(llm.encode(p), PARAMS) for p in prompts])
    return [s.output_ids for s in seqs], logits, [s.reused_tokens for s in seqs]


def close(eng: Engine) -> None:
    eng.kv.close()


@pytest.fixture(scope="module")
def fresh(dense):
    """QUESTIONS prefilled in full, in memory: (tokens, logits, _)."""
    return run(engine(dense, None, None), QUESTIONS, dense)


@pytest.mark.parametrize("placement", [None, *PLACEMENTS])
def test_reuse_equals_fresh_prefill(dense, fresh, tmp_path, placement):
    """A second engine (a new process's view of the store) reuses the stored leading blocks of
    both prompts: logits within fp32 tolerance of a fresh prefill, greedy tokens identical."""
    ref_tokens, ref_logits, _ = fresh
    store = str(tmp_path / "store")
    first = engine(dense, store, placement)
    try:
        tok1, log1, reused1 = run(first, QUESTIONS[:1], dense)
    finally:
        close(first)
    assert reused1 == [0]
    second = engine(dense, store, placement)
    try:
        tok2, log2, reused2 = run(second, QUESTIONS, dense)
        hits = second.prefix.dir.counters.hits
    finally:
        close(second)
    bs = GEOMETRY["block_size"]
    n0 = len(dense.encode(QUESTIONS[0]))
    assert reused2[0] == (n0 - 1) // bs * bs          # all but the block holding the last token
    shared = len(os.path.commonprefix([dense.encode(q) for q in QUESTIONS]))
    assert reused2[1] >= shared // bs * bs > 0       # the document's blocks, found again
    assert hits > 0
    for got, ref in [(log1[0], ref_logits[0]), (log2[0], ref_logits[0]), (log2[1], ref_logits[1])]:
        diff = (got - ref).abs()
        print(f"{placement}: max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
        assert diff.max().item() < 1e-4
    assert tok1[0] == ref_tokens[0] and tok2 == ref_tokens


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_reuse_of_compressed_blocks(tiny_hf, tmp_path, kv_dtype):
    """A compressed KV (``--kv-dtype int8 / int4``) is stored and reused as its compressed
    blocks; with one block a prefill chunk (so that a fresh prefill attends the same compressed
    prefix the reuse does, whatever the boundary), greedy output identical to the runs without
    a store, the second run reusing the first's blocks."""
    _, path = tiny_hf("qwen2")
    store = str(tmp_path / "s")
    kw = dict(dtype="float32", kv_dtype=kv_dtype, prefill_chunk=GEOMETRY["block_size"], prefix_sharing=False,
              **GEOMETRY)
    ref = LLM(path, **kw).generate(QUESTIONS, PARAMS)
    outs = []
    for _ in range(2):
        llm = LLM(path, kv_store=store, **kw)
        outs.append(llm.generate(QUESTIONS, PARAMS))
    assert llm.engine.prefix.dir.counters.hits > 0 and "blocks reused" in llm.kv_report()
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]] == [o.token_ids for o in ref]


def test_reuse_through_llm_api(tiny_hf, tmp_path):
    """``LLM(kv_store=...)``: the second LLM (new fingerprint computation, new index) reuses the
    first's blocks; greedy output identical; the report line says so."""
    _, path = tiny_hf("qwen2")
    store = str(tmp_path / "s")
    kw = dict(dtype="float32", prefill_chunk=16, prefix_sharing=False, **GEOMETRY)
    ref = LLM(path, **kw).generate(QUESTIONS, PARAMS)
    a = LLM(path, kv_store=store, **kw)
    out_a = a.generate(QUESTIONS, PARAMS)
    assert a.engine.prefix.dir.counters.hits > 0        # the second question reused the first's document
    b = LLM(path, kv_store=store, **kw)
    out_b = b.generate(QUESTIONS, PARAMS)
    assert [o.token_ids for o in out_a] == [o.token_ids for o in out_b] == [o.token_ids for o in ref]
    assert "blocks reused" in b.kv_report()
    assert b.engine.prefix.dir.counters.written == 0     # everything was there


def test_other_model_or_layout_never_matches(dense, tmp_path):
    """Blocks of another model (fingerprint) or KV layout share the directory but are never found."""
    store = str(tmp_path / "s")
    a = engine(dense, store, None, fingerprint="model-a")
    run(a, QUESTIONS[:1], dense)
    b = engine(dense, store, None, fingerprint="model-b")
    tokens, _, reused = run(b, QUESTIONS[:1], dense)
    assert reused == [0] and b.prefix.dir.counters.hits == 0
    ref, _, _ = run(engine(dense, None, None), QUESTIONS[:1], dense)
    assert tokens == ref
    # a different block size is a different layout: a different namespace
    from kvoffload.kv.layout import BlockLayout
    from kvoffload.kv.persist.store import namespace

    lay = a.kv.layout
    other = BlockLayout(8, lay.num_kv_heads, lay.head_dim, lay.dtype, lay.chunk_blocks)
    assert namespace("model-a", lay) != namespace("model-a", other)


def _block_files(store: str) -> list[str]:
    return sorted(p for _, p in BlockDir(store).files())


@pytest.mark.parametrize("damage", ["bitflip-payload", "bitflip-header", "truncate", "extend", "empty"])
def test_damaged_block_is_dropped_and_recomputed(dense, tmp_path, capfd, damage):
    """A damaged block is deleted with a one-line warning and recomputed: the answer is the
    fresh prefill's, the store holds a good copy again."""
    store = str(tmp_path / "s")
    run(engine(dense, store, None), QUESTIONS[:1], dense)
    files = _block_files(store)
    victim = files[len(files) // 2]
    data = bytearray(open(victim, "rb").read())
    if damage == "bitflip-payload":
        data[-100] ^= 0x10
    elif damage == "bitflip-header":
        data[100] ^= 0x01                                 # inside the parent key
    elif damage == "truncate":
        data = data[:len(data) - 512]
    elif damage == "extend":                              # longer than its blocks: read, then refused
        data += bytes(5000)
    else:
        data = bytearray()
    open(victim, "wb").write(bytes(data))
    capfd.readouterr()
    eng = engine(dense, store, None)
    tokens, logits, reused = run(eng, QUESTIONS[:1], dense)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "KV store block" in ln]
    assert len(lines) == 1 and "dropped" in lines[0] and "recomputing" in lines[0], err
    assert eng.prefix.dir.counters.damaged == 1
    ref_tokens, ref_logits, _ = run(engine(dense, None, None), QUESTIONS[:1], dense)
    assert tokens == ref_tokens
    assert (logits[0] - ref_logits[0]).abs().max().item() < 1e-4
    assert 0 < reused[0] < len(dense.encode(QUESTIONS[0]))           # the blocks before it were used
    # the block was written again, whole: every file verifies
    d = BlockDir(store)
    assert all(d.read(k, lambda h: True) is not None for k, _ in d.files())


def test_disk_full_during_write(dense, tmp_path, capfd, monkeypatch):
    """ENOSPC while a block is written: one warning, nothing half-written (no temporary file, no
    partial block), the answer unchanged; later blocks of the prompt are not stored either (a
    chain with a hole is never found past it)."""
    store = str(tmp_path / "s")
    calls = {"n": 0}
    real = store_mod._write_all

    def full_after_3(fd, data):
        calls["n"] += 1
        if calls["n"] > 3:
            os.write(fd, bytes(data)[:1000])                 # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    eng = engine(dense, store, None)
    monkeypatch.setattr(store_mod, "_write_all", full_after_3)
    tokens, _, _ = run(eng, QUESTIONS[:1], dense)
    err = capfd.readouterr().err
    assert err.count("the disk is full") == 1, err
    assert os.listdir(os.path.join(store, "tmp")) == []
    assert len(_block_files(store)) == 3
    monkeypatch.setattr(store_mod, "_write_all", real)
    ref, _, _ = run(engine(dense, None, None), QUESTIONS[:1], dense)
    assert tokens == ref
    again = engine(dense, store, None)
    tokens2, _, reused = run(again, QUESTIONS[:1], dense)
    assert tokens2 == ref and reused == [3 * GEOMETRY["block_size"]]


def test_budget_evicts_least_recently_used(dense, tmp_path):
    """Past the byte budget the least recently used blocks go first; the blocks of running
    sequences are kept; the index is rebuilt from the directory."""
    store = str(tmp_path / "s")
    eng = engine(dense, store, None)
    run(eng, ["alpha document " * 6 + "q"], dense)
    run(eng, ["beta document " * 6 + "q"], dense)
    d = BlockDir(store)
    per = next(iter(d.index.values())).bytes
    n_alpha = len(dense.encode("alpha document " * 6 + "q")) // GEOMETRY["block_size"]
    total = len(d.index)
    # use alpha again (touches it), then shrink the store to alpha's size: beta's blocks go
    run(eng, ["alpha document " * 6 + "q"], dense)
    evicted = BlockDir(store).enforce_budget(n_alpha * per)
    assert evicted == total - n_alpha
    again = engine(dense, store, None)
    _, _, reused = run(again, ["alpha document " * 6 + "q", "beta document " * 6 + "q"], dense)
    assert reused[0] > 0 and reused[1] == 0


def test_budget_enforced_after_each_prompt(dense, tmp_path):
    store = str(tmp_path / "s")
    probe = engine(dense, store, None)
    run(probe, QUESTIONS[:1], dense)
    d = BlockDir(store)
    one = next(iter(d.index.values())).bytes
    budget = 5 * one
    eng = engine(dense, str(tmp_path / "t"), None, budget=budget)
    run(eng, QUESTIONS, dense)
    assert BlockDir(str(tmp_path / "t")).bytes_held <= budget
    assert eng.prefix.dir.counters.evicted > 0


def test_killed_writer_leaves_store_that_opens(tmp_path):
    """A temporary file of a dead writer (killed mid-write) is removed when the store opens; a
    live writer's is kept."""
    store = str(tmp_path / "s")
    BlockDir(store)
    dead = os.path.join(store, "tmp", f"{'ab' * 32}.kvb.999999999.0000.tmp")
    live = os.path.join(store, "tmp", f"{'cd' * 32}.kvb.{os.getppid()}.0000.tmp")
    for p in (dead, live):
        open(p, "wb").write(b"partial")
    BlockDir(store)
    assert not os.path.exists(dead) and os.path.exists(live)


def test_unusable_store_directory(tmp_path, tiny_hf):
    """A file, an unwritable directory or a foreign directory: one-line errors before the load."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        BlockDir(str(f))
    if os.geteuid() == 0:             # root writes anywhere but on a filesystem that refuses it
        existing, missing = "/sys/kernel", "/sys/kvoffload-store"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        existing, missing = str(ro), str(ro / "sub")
    with pytest.raises(StoreError, match=f"KV store {existing} is not writable"):
        BlockDir(existing)
    with pytest.raises(StoreError, match=f"cannot create KV store {missing}"):
        BlockDir(missing)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "store.json").write_text('{"kind": "something else"}')
    with pytest.raises(StoreError, match="not a kvoffload KV store"):
        BlockDir(str(foreign))
    (foreign / "store.json").write_text('{"kind": "kvoffload-kv-store", "format": 99}')
    with pytest.raises(StoreError, match="format 99"):
        BlockDir(str(foreign))
    _, path = tiny_hf("qwen2")
    with pytest.raises(KvoffloadError, match="is not a directory"):
        LLM(path, kv_store=str(f))


def test_store_files_are_private(dense, tmp_path):
    store = str(tmp_path / "s")
    run(engine(dense, store, None), QUESTIONS[:1], dense)
    assert os.stat(store).st_mode & 0o777 == 0o700
    for p in _block_files(store):
        assert os.stat(p).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("extra", POLICY_CASES, ids=POLICY_IDS)
def test_reuse_with_policy_metadata(tiny_hf, tmp_path, extra):
    """A sparse policy's metadata (and the self-draft's) is built from the loaded blocks as from a
    prefill: the greedy tokens equal those of the same engine without a store. (Blocks of 8
    tokens: ShadowKV and retrieval score chunks of 8.)"""
    model, path = tiny_hf("qwen2")
    extra = with_calibration(extra, model.config, tmp_path)
    kw = dict(dtype="float32", prefill_chunk=16, block_size=8, chunk_blocks=2, prefix_sharing=False, **extra)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [o.token_ids for o in LLM(path, **kw).generate(QUESTIONS, params)]
    store = str(tmp_path / "s")
    LLM(path, kv_store=store, kv_store_fsync="none", **kw).generate(QUESTIONS[:1], params)
    b = LLM(path, kv_store=store, kv_store_fsync="none", **kw)
    outs = b.generate(QUESTIONS, params)
    assert all(o.metrics.reused_tokens > 0 for o in outs)
    assert [o.token_ids for o in outs] == ref


WRITER = """
import sys, torch
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.persist.prefix import PrefixStore
from kvoffload.kv.persist.store import BlockDir, chain_keys
path, seed = sys.argv[1], int(sys.argv[2])
lay = BlockLayout(4, 2, 16, "float32", 2)
p = PrefixStore(BlockDir(path, budget=40 * (4096 + 3 * 4096), fsync="none"), "m", lay, 3)
g = torch.Generator().manual_seed(0)
for rep in range(20):
    tokens = [(rep * 7 + i) % 50 for i in range(32)]            # the same prompts in every process
    keys = chain_keys(p.ns, tokens, 4, 8)
    slots = torch.randn(3, 8, lay.slot_elems, generator=g)
    p.save(tokens, keys, 0, slots)
    found = p.find(keys)
    assert found is None or torch.equal(found.slots, slots[:, :found.blocks]), "a block read back differs"
    p.dir.enforce_budget()
"""


def test_several_processes_share_a_store(tmp_path):
    """Three processes write the same chains, read them back and evict past a budget at once:
    every block read equals what was written, every block left verifies, no temporary file stays."""
    import subprocess
    import sys

    store = str(tmp_path / "s")
    BlockDir(store)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, store, str(i)], stderr=subprocess.PIPE)
             for i in range(3)]
    for p in procs:
        err = p.communicate(timeout=120)[1].decode()
        assert p.returncode == 0, err
        assert "dropped" not in err, err
    d = BlockDir(store)
    assert d.index and d.bytes_held <= 40 * (4096 + 3 * 4096)
    assert all(d.check(k) is None for k in d.index)
    assert os.listdir(os.path.join(store, "tmp")) == []


def test_found_blocks_are_a_writable_copy_without_warnings(tmp_path):
    """Slots of a whole number of pages (no padding on disk, as SmolLM2's 12 KiB bf16 slots):
    what `find` returns is a writable copy, made without torch's read-only-array warning."""
    import warnings

    from kvoffload.kv.layout import BlockLayout
    from kvoffload.kv.persist.store import chain_keys

    lay = BlockLayout(16, 2, 32, "float32", 2)
    assert lay.slot_bytes == lay.disk_stride                       # 8 KiB: no page padding
    p = PrefixStore(BlockDir(str(tmp_path / "s"), fsync="none"), "m", lay, 3)
    tokens = list(range(64))
    keys = chain_keys(p.ns, tokens, 16, 4)
    slots = torch.randn(3, 4, lay.slot_elems, generator=torch.Generator().manual_seed(0))
    p.save(tokens, keys, 0, slots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = p.find(keys)
    assert found is not None and found.blocks == 4 and torch.equal(found.slots, slots)
    found.slots.add_(1)                                            # its own memory
    assert torch.equal(p.find(keys).slots, slots)


@pytest.mark.parametrize("head_dim", [32, 24])
def test_found_blocks_read_straight_into_the_kv_memory(tmp_path, head_dim):
    """`load(keys, place, into=view)` (the in-memory backend's `slot_buffer`) fills the view
    itself and hands it on once — the bytes `find` returns, with padding on disk (head_dim 24:
    3 KiB slots) or without — and without `into` hands them on a few at a time; both stop at a
    damaged block with the blocks before it in place and nothing written past them."""
    from kvoffload.kv.layout import BlockLayout
    from kvoffload.kv.persist.store import chain_keys

    lay = BlockLayout(16, 2, head_dim, "bfloat16", 2)
    p = PrefixStore(BlockDir(str(tmp_path / "s"), fsync="none"), "m", lay, 3)
    tokens = list(range(80))
    keys = chain_keys(p.ns, tokens, 16, 5)
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 255, (3, 5, lay.slot_bytes), dtype=torch.uint8, generator=g)
    assert p.save(tokens, keys, 0, raw.view(p.dtype)) == 5
    kv = torch.zeros(3, 8, lay.slot_elems, dtype=p.dtype)                # a sequence's slots, every layer
    handed = []
    assert p.load(keys, lambda i, s: handed.append((i, s)), into=kv[:, 1:6]) == 5
    assert [(i, s.shape[1], s.data_ptr()) for i, s in handed] == [(0, 5, kv[:, 1:6].data_ptr())]
    b = kv.view(torch.uint8)
    assert torch.equal(b[:, 1:6], raw) and torch.equal(p.find(keys).slots.view(torch.uint8), raw)
    assert not b[:, [0, 6, 7]].any()
    placed = []                                  # load(): a few blocks at a time through one buffer
    assert p.load(keys, lambda i, s: placed.append((i, s.view(torch.uint8).clone())), batch=2) == 5
    assert [i for i, _ in placed] == [0, 2, 4] and torch.equal(torch.cat([s for _, s in placed], 1), raw)
    with open(p.dir.file_of(keys[3].hex()), "r+b") as f:                 # block 3 damaged
        f.seek(4096 + 5)
        f.write(bytes(3) if raw[0, 3, 5:8].any() else b"\x01\x02\x03")
    kv.zero_()
    handed.clear()
    assert p.load(keys, lambda i, s: handed.append((i, s)), into=kv[:, 1:6]) == 3
    assert [(i, s.shape[1]) for i, s in handed] == [(0, 3)]
    assert torch.equal(b[:, 1:4], raw[:, :3]) and not b[:, 4:].any()
    placed.clear()
    assert p.load(keys, lambda i, s: placed.append((i, s.view(torch.uint8).clone())), batch=2) == 3
    assert [i for i, _ in placed] == [0, 2] and torch.equal(torch.cat([s for _, s in placed], 1), raw[:, :3])


def test_writes_behind_the_model_in_chain_order(tmp_path, monkeypatch, capfd):
    """`save` queues its blocks for the writer thread and returns: a queued block counts as
    present (`missing`), a lookup waits for the writes; a write that fails (a full disk) ends
    its prompt's chain — the later blocks, also those of a later `save` of the same prompt, are
    not written — while another prompt's chain is written whole. One warning."""
    import threading

    from kvoffload.kv.layout import BlockLayout
    from kvoffload.kv.persist.store import chain_keys

    lay = BlockLayout(16, 2, 32, "float32", 2)
    p = PrefixStore(BlockDir(str(tmp_path / "s"), fsync="none"), "m", lay, 3)
    g = torch.Generator().manual_seed(2)
    a, b = list(range(80)), list(range(100, 180))
    ka, kb = chain_keys(p.ns, a, 16, 5), chain_keys(p.ns, b, 16, 5)
    sa, sb_ = torch.randn(3, 5, lay.slot_elems, generator=g), torch.randn(3, 5, lay.slot_elems, generator=g)
    gate, real, calls = threading.Event(), store_mod._write_all, {"n": 0}

    def slow_then_full(fd, data):                    # (the writer thread) holds until released
        gate.wait(10)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(store_mod, "_write_all", slow_then_full)
    capfd.readouterr()
    assert p.save(a, ka, 0, sa[:, :3]) == 3 and p.save(a, ka, 3, sa[:, 3:]) == 2   # prompt a, two chunks
    assert p.missing(ka) == 5 and not list(p.dir.files())          # queued, none written yet
    gate.set()
    assert p.save(b, kb, 0, sb_) == 5
    found = p.find(ka)                               # waits for the writes first
    assert found is not None and found.blocks == 1 and torch.equal(found.slots, sa[:, :1])
    assert p.missing(ka) == 1                        # block 1 failed; 2-4 never written (past the hole)
    assert torch.equal(p.find(kb).slots, sb_)        # the other prompt: whole
    err = capfd.readouterr().err
    assert err.count("could not be written") == 1 and "disk is full" in err, err
    assert not os.listdir(os.path.join(p.dir.path, "tmp"))       # nothing half-written
