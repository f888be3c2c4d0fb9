"""The ray tier on a real local Ray cluster (tests/ray_cluster.py: a head and two worker nodes,
the actors in their own processes on other raylets): logits within fp32 tolerance of the
all-in-memory run and greedy output identical with the actors merging their chunks (the
bit-exact mode runs through the whole placement matrix), the KV wholly and partly on the
actors, with a sparse policy and with speculation; an actor killed mid-decode and a node that
leaves mid-run are survived with the output unchanged, or end in a one-line error naming the
node; no Ray, a wrong address or a cluster without room are one-line errors within seconds."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
from ray_cluster import available
from test_cli import assert_one_line_error, kvo

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.errors import ConfigError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.protocol import AttendRequest
from kvoffload.kv.tiers.ray import Journal, RayShardError, import_ray
from kvoffload.kv.tiers.ray_worker import ShardServer, merge_rows

PROMPTS = ["the quick brown fox jumps over the lazy dog " * 3, "hello", "a medium prompt for the tiers", "xyz " * 9]
GEOMETRY = dict(block_size=4, chunk_blocks=2)
RAY = dict(ray_timeout=60.0, kv_sink_tokens=0, kv_recent_tokens=0)
PLACES = {"whole": dict(kv_tiers="ray:none"), "part": dict(kv_tiers="host:8KiB,ray:none")}
needs_ray = pytest.mark.skipif(not available(), reason="ray is not installed (pip install \"kvoffload[ray]\")")


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


@pytest.fixture(scope="module")
def dense(tiny_path):
    return LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY)


def report(what: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    d = (got - ref).abs()
    print(f"{what}: max {d.max().item():.2e} mean {d.mean().item():.2e}")
    return d.max().item()


def greedy(llm: LLM, n: int = 16) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True))]


# ---------------------------------------------------------------- without a cluster

def test_merge_rows_equals_merging_every_chunk():
    """An actor's merge of its chunks per batch row, then the driver's merge of the shards'
    parts, equals merging every chunk's partial at once (fp32 tolerance)."""
    from kvoffload.kernels.reference import merge_parts

    rng = np.random.default_rng(0)
    N, L, H, D = 9, 2, 4, 8
    seq = np.array([0, 0, 2, 1, 1, 1, 2, 0, 2])
    o = rng.standard_normal((N, L, H, D)).astype(np.float32)
    lse = rng.standard_normal((N, L, H)).astype(np.float32) * 3
    lse[4, 1, 2] = -np.inf                                          # a head that attended nothing
    first, mo, ml = merge_rows(seq, o, lse)
    assert list(seq[first]) == [0, 1, 2] and list(first) == [0, 3, 2]   # each row's first item
    for r in range(3):
        items = np.nonzero(seq == r)[0]
        for l in range(L):
            want_o, want_l = merge_parts(np.array([0, len(items)]), items * L + l, o.reshape(N * L, H, D),
                                         lse.reshape(N * L, H))
            np.testing.assert_allclose(mo[r, l], want_o[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ml[r, l], want_l[0], rtol=1e-5, atol=1e-6)


def test_block_lists_as_runs():
    """Whole chunks travel as one slot per item; anything else (sparse choices) as it is."""
    from kvoffload.kv.tiers.shards import as_runs, from_runs

    first = np.array([0, 4, 6, 10])
    slots = np.array([8, 9, 10, 11, 2, 3, 20, 21, 22, 23])
    runs = as_runs(first, slots)
    assert list(runs) == [8, 2, 20] and np.array_equal(from_runs(first, runs), slots)
    assert as_runs(first, np.array([8, 9, 11, 12, 2, 3, 20, 21, 22, 23])) is None


def test_journal_replays_each_slots_latest_bytes(tmp_path):
    j = Journal(str(tmp_path / "j"), 4)
    j.append(np.array([0, 1, 2]), np.arange(12, dtype=np.uint8).reshape(3, 4))
    j.append(np.array([1, 7]), np.full((2, 4), 200, np.uint8))           # slot 1 written again
    got = {int(s): bytes(r) for slots, raw in j.replay() for s, r in zip(slots, raw)}
    assert got == {0: bytes([0, 1, 2, 3]), 1: bytes([200] * 4), 2: bytes([8, 9, 10, 11]), 7: bytes([200] * 4)}
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o600
    j.close()


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_shard_server_in_process_equals_reference(storage, tmp_path):
    """The actor's code without Ray: blocks written, read back, attended (native kernel vs the
    numpy reference, merged or not)."""
    lay = BlockLayout(4, 2, 8, "float32", 2)
    rng = np.random.default_rng(1)
    data = rng.standard_normal((6, lay.slot_elems)).astype(np.float32)
    q = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    req = AttendRequest(0, q, np.array([0, 1, 0]), np.array([0, 2, 4, 6]), np.array([4, 5, 0, 1, 2, 3]))
    outs = []
    for native in (True, False):
        s = ShardServer(vars(lay), 2, 1, storage, 4, dict(batch_bytes=1 << 16), native, str(tmp_path))
        try:
            s.write(np.arange(6), data.view(np.uint8))
            assert s.read(np.array([3, 0])).tobytes() == data[[3, 0]].tobytes()
            outs.append((s.attend(req, False), s.attend(req, True)))
        finally:
            s.close()
    (_, o1, l1, r1), (f1, mo1, ml1, _) = outs[0]
    (_, o2, l2, _), (f2, mo2, ml2, _) = outs[1]
    assert r1 == 6 * (lay.disk_stride if storage == "disk" else lay.slot_bytes)     # a disk reads whole pages
    assert list(f1) == list(f2) == [0, 1]
    np.testing.assert_allclose(o1, o2, atol=1e-5)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    np.testing.assert_allclose(mo1, mo2, atol=1e-5)
    assert list(tmp_path.iterdir()) == []                     # a disk shard's directory goes with it


def test_without_ray_one_line_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)               # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "kvoffload\[ray\]"'):
        import_ray()


def test_wrong_address_is_a_one_line_error_within_seconds(tiny_hf):
    if not available():
        pytest.skip("ray is not installed: the error then names the install step (tested above)")
    _, path = tiny_hf("qwen2")
    t0 = time.time()
    r = kvo("generate", "-m", path, "--prompt", "hi", "-n", "2", "--kv-tiers", "ray:none",
            "--ray-address", "127.0.0.1:1", timeout=120)
    took = time.time() - t0
    assert_one_line_error(r, "cannot reach a Ray cluster at 127.0.0.1:1")
    assert took < 30, took


# ---------------------------------------------------------------- on the local cluster

@needs_ray
@pytest.mark.parametrize("place", list(PLACES))
def test_merged_on_actors_logits_close_greedy_identical(ray_cluster, dense, tiny_path, place):
    """Each actor merges its chunks of a row (the default): logits within fp32 tolerance of the
    all-in-memory run, greedy output identical; the replies are smaller than the exact mode's."""
    ids = dense.encode(PROMPTS[0])[:70]
    ref = dense.engine.teacher_forced_logits(ids, 37)
    llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY, **RAY, **PLACES[place])
    try:
        tier = llm.engine.kv.tiers[-1]
        assert tier.name == "ray" and len(set(tier.nodes())) == 2             # one actor on each worker node
        assert report(f"ray merged ({place})", llm.engine.teacher_forced_logits(ids, 37), ref) < 1e-4
        assert greedy(llm) == greedy(dense)
        c = tier.counters
        assert c.read > 0 and c.to_worker > 0 and 0 < c.from_worker
        print(f"ray tier: to actors {c.to_worker} B, back {c.from_worker} B, blocks {c.blocks}")
    finally:
        llm.close()


@needs_ray
@pytest.mark.parametrize("exact", [True, False])
def test_sparse_policy_on_actors(ray_cluster, tiny_path, exact):
    """Quest at 1/4 with its chosen blocks attended on the actors (token masks travel with the
    block lists) = the same policy in memory (bit for bit in the exact mode)."""
    kw = dict(dtype="float32", prefill_chunk=32, sparse_policy="quest", sparse_budget="1/4",
              sparse_dense_layers="none", block_size=8, chunk_blocks=2)
    mem = LLM(tiny_path, **kw)
    ids = mem.encode(PROMPTS[0] * 2)[:220]
    off = LLM(tiny_path, **kw, kv_tiers="host:4KiB,ray:none", ray_exact=exact, ray_timeout=60.0,
              kv_recent_tokens=16, kv_sink_tokens=0)
    try:
        a, b = mem.engine.teacher_forced_logits(ids, 70), off.engine.teacher_forced_logits(ids, 70)
        d = report(f"quest 1/4 on ray ({'exact' if exact else 'merged'}) vs in memory", b, a)
        assert torch.equal(a, b) if exact else d < 1e-4
        assert greedy(off) == greedy(mem)
        sa, sb = mem.engine.kv.stats().sparse, off.engine.kv.stats().sparse
        assert (sa.read, sa.attended) == (sb.read, sb.attended) and 0 < sb.attended / sb.context < 0.35
        assert off.engine.kv.stats().tiers["ray"].read > 0
    finally:
        off.close()
        mem.close()


@needs_ray
def test_speculation_merged_on_actors_greedy_identical(ray_cluster, dense, tiny_path):
    """Self-speculation (a verify pass sends gamma+1 query rows per sequence) over the actors."""
    llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, speculate="self",
              num_speculative_tokens=3, spec_draft_budget=16, spec_draft_share="1/2", spec_draft_window=8,
              sparse_chunk=4, **GEOMETRY, **RAY, **PLACES["part"])
    try:
        assert greedy(llm, 24) == greedy(dense, 24)
        st = llm.engine.spec.stats
        assert 0 < st.accepted < st.drafted
    finally:
        llm.close()


@needs_ray
def test_actor_killed_mid_decode_is_replaced_output_unchanged(ray_cluster, dense, tiny_path):
    """Two actors killed (SIGKILL through Ray) at different steps: each is started again, its
    shard replayed from the journal, the request in flight sent again; the tokens are the same."""
    import ray

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = greedy(dense, 24)
    llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY, **RAY, **PLACES["whole"])
    try:
        eng, tier = llm.engine, llm.engine.kv.tiers[0]
        ids = [eng.add_request(llm.encode(p), params) for p in PROMPTS]
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            if steps in (6, 13):
                ray.kill(tier.shards[steps % 2].actor, no_restart=True)
        assert [eng.pop_finished(i).output_ids for i in ids] == ref
        assert tier.restarts == 2
    finally:
        llm.close()


class JoinedNode:
    """A node that joins the session's cluster for one test and leaves (its raylet stopped) when
    the test says so, or at the end."""

    def __init__(self, cluster) -> None:
        self.cluster, self.node = cluster, cluster.add_node()
        self.id = self.node.node_id

    def leave(self) -> None:
        if self.node is not None:
            self.cluster.remove_node(self.node)
            self.node = None

    def __enter__(self) -> JoinedNode:
        return self

    def __exit__(self, *exc) -> None:
        self.leave()


def _step_until_done(eng, ids):
    while eng.has_unfinished():
        eng.step()
    return [eng.pop_finished(i).output_ids for i in ids]


@needs_ray
def test_node_leaves_mid_run_shard_rebuilt_elsewhere(ray_cluster, dense, tiny_path):
    """A third node joins, one of three actors lands there; the node leaves mid-decode (its
    raylet stopped): Ray moves that bundle to a node with room, the shard is rebuilt there from
    the journal and the output is unchanged."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = greedy(dense, 20)
    with JoinedNode(ray_cluster) as node:
        llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY, **RAY,
                  ray_shards=3, **PLACES["whole"])
        try:
            eng, tier = llm.engine, llm.engine.kv.tiers[0]
            on_node = [s for s in tier.shards if s.info["node"] == node.id]
            assert len(on_node) == 1, tier.nodes()                  # SPREAD: one actor on each of the three nodes
            ids = [eng.add_request(llm.encode(p), params) for p in PROMPTS]
            for _ in range(5):
                eng.step()
            node.leave()
            assert _step_until_done(eng, ids) == ref
            assert on_node[0].restarts >= 1 and on_node[0].info["node"] != node.id
            assert node.id not in {s.info["node"] for s in tier.shards}
        finally:
            llm.close()


@needs_ray
def test_node_leaves_without_room_elsewhere_one_line_error_naming_it(ray_cluster, tiny_path):
    """Each actor takes a whole node's CPUs: when a node leaves there is nowhere to rebuild its
    shard, and the step fails within the deadline with an error naming that node (no hang)."""
    with JoinedNode(ray_cluster) as node:
        llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, **GEOMETRY, **PLACES["whole"],
                  ray_timeout=5.0, ray_shards=3, ray_shard_cpus=2.0, kv_sink_tokens=0, kv_recent_tokens=0)
        try:
            eng, tier = llm.engine, llm.engine.kv.tiers[0]
            assert any(s.info["node"] == node.id for s in tier.shards), tier.nodes()
            ids = [eng.add_request(llm.encode(p), SamplingParams(max_tokens=20, ignore_eos=True)) for p in PROMPTS]
            for _ in range(3):
                eng.step()
            node.leave()
            t0 = time.time()
            with pytest.raises(RayShardError) as err:
                _step_until_done(eng, ids)
            took = time.time() - t0
            msg = str(err.value)
            print(f"{took:.1f} s: {msg}")
            assert "\n" not in msg and node.id[:12] in msg and "could not be placed" in msg
            assert took < 60, took
        finally:
            llm.close()


@needs_ray
def test_cluster_without_room_is_a_one_line_error(ray_cluster, tiny_path):
    with pytest.raises(ConfigError, match=r"cannot place 2 ray KV shards .* within 3 s"):
        LLM(tiny_path, dtype="float32", kv_tiers="ray:none", ray_shard_cpus=64.0, ray_timeout=3.0)


@needs_ray
def test_actor_storage_on_its_nodes_disk(ray_cluster, dense, tiny_path):
    """``--ray-storage disk``: each actor keeps its shard in a private file on its node and
    reads it as the disk workers do; bit for bit in the exact mode."""
    ids = dense.encode(PROMPTS[0])[:70]
    ref = dense.engine.teacher_forced_logits(ids, 37)
    llm = LLM(tiny_path, dtype="float32", prefill_chunk=16, **GEOMETRY, **RAY, **PLACES["part"],
              ray_storage="disk", ray_exact=True)
    try:
        assert llm.engine.kv.tiers[-1].medium == "disk"
        got = llm.engine.teacher_forced_logits(ids, 37)
        report("ray disk storage (exact)", got, ref)
        assert torch.equal(got, ref)
    finally:
        llm.close()
