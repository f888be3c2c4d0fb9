"""The native selection (kernels/select.c: one call per layer for the whole batch) against the
PyTorch reference (SparsePolicy.select, one sequence at a time), for every registered policy.

Ties aside: the kernel computes the same scores in another order (channel-major sums,
base-2 log-probabilities for the softmax policies, an exp polynomial), equal to the reference's
up to fp32 rounding. So at the cut-off, units whose scores tie within rounding may be ordered
differently. Where the native and the reference selections differ, every differing unit's
reference score must lie within ``TIE_RTOL`` (relative to the scores' scale) of the k-th best
reference score of its head; everything else must be identical (union blocks, masks, counts).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvoffload.config import SparseConfig
from kvoffload.kernels import build
from kvoffload.sparse import make_policy
from kvoffload.sparse.base import Selection, SparseCounters, tiled_read
from kvoffload.sparse.registry import POLICIES

pytestmark = pytest.mark.skipif(build.load("select") is None, reason="native selection unavailable (no compiler, or KVOFFLOAD_NO_KERNELS=1)")

BS = 16
# one kernel thread (test_threads checks that more give the same selections)
THREADS = 1
TIE_RTOL = 2e-5
# ragged batch lengths (tokens after the decode token): inside the first block, at and past block
# boundaries, longer
LENGTHS = (1, 5, 16, 17, 32, 33, 100, 257, 600, 2100)
GEOMETRIES = {"3x3x64": (3, 3, 64), "2x7x64": (2, 7, 64), "tiny": (1, 2, 8)}
BUDGETS = ("1/16", "1/4", "48", "all")


class Model:
    def __init__(self, H_kv: int, G: int, D: int) -> None:
        self.num_kv_heads, self.head_dim, self.num_heads, self.num_layers = H_kv, D, H_kv * G, 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference's small ops on one thread (fast, and no OpenMP team to wait for on a busy
    machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    """A channel file per geometry (a random channel order per layer and KV head)."""
    out, rs = {}, np.random.RandomState(7)
    for name, (H_kv, _, D) in GEOMETRIES.items():
        path = tmp_path_factory.mktemp("cal") / f"{name}.json"
        path.write_text(json.dumps({"format": "kvoffload-channels/1",
                                    "channels": [[rs.permutation(D).tolist() for _ in range(H_kv)] for _ in range(2)]}))
        out[name] = str(path)
    return out


def twins(policy: str, geometry: str, budget: str, calibration: str, bs: int = BS, **kw):
    """A native and a reference policy of one configuration (layer 0 dense, layer 1 sparse)."""
    cfg = SparseConfig(sparse_policy=policy, sparse_budget=budget, sparse_dense_layers="0",
                       sparse_calibration=calibration, **kw)
    model = Model(*GEOMETRIES[geometry])
    nat, ref = (make_policy(cfg, model, bs, torch.device("cpu")) for _ in range(2))
    ref.native = False
    nat.threads = THREADS
    return nat, ref, model


def token_sets(blocks: np.ndarray, masks: np.ndarray, bs: int) -> list[set[int]]:
    """Per KV head, the tokens of the full blocks it attends (a union's form)."""
    out = []
    for h in range(masks.shape[1]):
        s = set()
        for b, m in zip(blocks.tolist(), masks[:, h].tolist()):
            s.update(b * bs + t for t in range(bs) if (m >> t) & 1)
        out.append(s)
    return out


def check_ties(ref_pol, sel_n: Selection, sel_r: Selection, layer: int, sid: int, q: torch.Tensor, length: int) -> int:
    """The differing units of the two selections tie with the cut-off (see the module
    docstring); returns how many units differ."""
    pol = ref_pol
    bs = pol.bs
    _, lo, hi, k = pol.geometry(length)
    st = pol.states[sid][layer]
    if k == 0:
        scores = torch.zeros(pol.H_kv, 0)
    else:
        scores = pol.score(st, q.float().reshape(pol.H_kv, pol.G, pol.D), lo, hi, length)  # [H_kv, units]
    if hasattr(st, "probs"):
        st.probs = None                                    # (SparF keeps them for its finish)
    tn, tr = token_sets(*sel_n.union(bs), bs), token_sets(*sel_r.union(bs), bs)
    differ = 0
    for h in range(pol.H_kv):
        assert k > 0 or tn[h] == tr[h], "nothing to choose, yet the selections differ"
        if k == 0:
            continue
        row = scores[h].double()
        cut = row.topk(k).values[-1].item()
        tol = TIE_RTOL * (abs(cut) + row.abs().median().item()) + 1e-30
        units = {(t - lo * bs) // pol.unit for t in tn[h] ^ tr[h]}
        assert all(lo * bs <= t < hi * bs for t in tn[h] ^ tr[h]), "fixed blocks differ"
        for u in units:
            assert abs(row[u].item() - cut) <= tol, (h, u, row[u].item(), cut, tol)
        differ += len(units)
    return differ


def feed_prefill(pols, model, gen: torch.Generator, lengths) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Allocate every sequence (less capacity than it will need: the native path grows it) and
    append its first ``length - 1`` tokens in uneven prefill chunks; returns each sequence's k/v
    ``[H_kv, T + steps, D]``."""
    H_kv, D = model.num_kv_heads, model.head_dim
    kv = []
    for sid, n in enumerate(lengths):
        k = torch.randn(H_kv, n + 8, D, generator=gen)
        v = torch.randn(H_kv, n + 8, D, generator=gen)
        kv.append((k, v))
        for p in pols:
            p.allocate(sid, max(1, n // 2))
            at = 0
            for piece in (n - 1) // 3, n - 1 - (n - 1) // 3:
                if piece:
                    p.append(1, sid, at, k[:, at:at + piece], v[:, at:at + piece])
                    at += piece
    return kv


def compare_step(nat, ref, model, kv, starts, gen, stats, q_dtype=torch.float32) -> None:
    """One decode step of the batch through both policies: unions, counts, SparF's terms."""
    B, H, H_kv, D, bs = len(starts), model.num_heads, model.num_kv_heads, model.head_dim, nat.bs
    q = torch.randn(B, H, D, generator=gen).to(q_dtype)
    k_new = torch.stack([k[:, s] for (k, _), s in zip(kv, starts)])                    # [B, H_kv, D]
    v_new = torch.stack([v[:, s] for (_, v), s in zip(kv, starts)])
    ids = tuple(range(B))
    got = nat.select_batch(1, ids, q, starts, k_new, v_new)
    want = ref.select_batch(1, ids, q, starts, k_new, v_new)
    assert nat._kernel, "the native path did not run"
    for b, (gn, gr) in enumerate(zip(got, want)):
        length = starts[b] + 1
        (bn, mn), (br, mr) = gn.union(bs), gr.union(bs)
        if np.array_equal(bn, br) and np.array_equal(mn, mr):
            assert gn.chosen_tokens(bs) == gr.chosen_tokens(bs) and gn.read_blocks() == gr.read_blocks()
            # the per-head form derived from the union is the reference's
            assert all(np.array_equal(x, y) for x, y in zip(gn.blocks, gr.blocks))
            full = np.uint64((1 << bs) - 1)                # None: the whole blocks
            assert all(np.array_equal(np.full(len(bl), full) if x is None else x, np.full(len(bl), full) if y is None else y)
                       for bl, x, y in zip(gr.blocks, gn.masks, gr.masks))
        else:
            stats["differ"] += check_ties(ref, gn, gr, 1, b, q[b], length)
        stats["units"] += nat.geometry(length)[3] * H_kv
        if gr.alpha is not None:
            da = (gn.alpha - gr.alpha).abs().max().item()
            dv = (gn.vmean - gr.vmean).abs().max().item()
            stats["alpha"] = max(stats["alpha"], da)
            stats["vmean"] = max(stats["vmean"], dv)
            assert da < 1e-5 and dv < 1e-5, (da, dv)
        else:
            assert gn.alpha is None


def state_arrays(pol, st, length: int) -> dict[str, torch.Tensor]:
    """The valid part of a state's metadata after ``length`` tokens (tiled arrays as [H_kv, C, n])."""
    if st is None:
        return {}
    name = pol.name
    if name == "quest":
        nb = -(-length // pol.bs)
        return {"kmin": tiled_read(st.kmin, 0, nb), "kmax": tiled_read(st.kmax, 0, nb)}
    if name == "sparf":
        return {"k": st.k[:, :, :st.n], "vsum": st.vsum, "n": torch.tensor(st.n)}
    if name == "double_sparsity":
        return {"k": tiled_read(st.k, 0, st.n), "n": torch.tensor(st.n)}
    return {"land": tiled_read(st.land, 0, st.n), "mincos": st.mincos[:, :st.n], "pending": st.pending[:, :st.p],
            "n": torch.tensor(st.n), "p": torch.tensor(st.p)}


def compare_states(nat, ref, lengths, stats) -> None:
    for sid, n in enumerate(lengths):
        a = state_arrays(nat, nat.states[sid][1], n)
        b = state_arrays(ref, ref.states[sid][1], n)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape, key
            d = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
            stats["meta"] = max(stats["meta"], d)
            exact = key in ("kmin", "kmax", "k", "vsum", "n", "p", "pending")      # copies, min/max, one add
            assert d == 0.0 if exact else d < 1e-5, (key, d)


def run_case(policy, geometry, budget, calibration, steps=3, seed=0, lengths=LENGTHS, q_dtype=torch.float32,
             lib=None, bs=BS, **kw):
    nat, ref, model = twins(policy, geometry, budget, calibration, bs, **kw)
    if lib is not None:
        nat.native_lib = lib
    gen = torch.Generator().manual_seed(seed)
    kv = feed_prefill((nat, ref), model, gen, lengths)
    stats = {"differ": 0, "units": 0, "alpha": 0.0, "vmean": 0.0, "meta": 0.0}
    for step in range(steps):
        starts = tuple(n - 1 + step for n in lengths)
        compare_step(nat, ref, model, kv, starts, gen, stats, q_dtype)
        compare_states(nat, ref, [s + 1 for s in starts], stats)
    return stats


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_native_equals_reference(policy, budget, geometry, calibrations):
    """Every policy, budget and GQA shape, a ragged batch, three decode steps: the same unions
    and masks (ties aside), counts, alpha / vmean, and metadata after the native appends."""
    stats = run_case(policy, geometry, budget, calibrations[geometry])
    print(f"{policy} {budget} {geometry}: {stats['differ']} of {stats['units']} units differ (ties); "
          f"max |d alpha| {stats['alpha']:.1e}, |d vmean| {stats['vmean']:.1e}, |d metadata| {stats['meta']:.1e}")
    assert stats["differ"] <= max(2, stats["units"] // 1000)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_sinks_and_recent_settings(policy, calibrations):
    """Overridden sink / recent-window sizes (not multiples of the block) go through the same
    geometry natively."""
    for sink, recent in ((20, 40), (0, 0), (100, 7)):
        run_case(policy, "3x3x64", "1/4", calibrations["3x3x64"], steps=2,
                 sparse_sink_tokens=sink, sparse_recent_tokens=recent)


@pytest.mark.parametrize("bs", [8, 32, 64])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_block_sizes(policy, bs, calibrations):
    """Other block sizes: masks of 8 tokens (the kernel's scalar bit path), 32 and 64 (a whole
    uint64)."""
    run_case(policy, "3x3x64", "1/4", calibrations["3x3x64"], steps=2, bs=bs,
             lengths=(1, 8, 9, 64, 65, 300, 1000))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_model_dtype_queries(policy, calibrations):
    """bf16 queries and KV (the model's dtypes) are read as they are by the kernel."""
    nat, ref, model = twins(policy, "2x7x64", "1/16", calibrations["2x7x64"])
    gen = torch.Generator().manual_seed(3)
    lengths = (40, 300)
    kv = [tuple(x.bfloat16() for x in pair) for pair in feed_prefill((nat, ref), model, gen, lengths)]
    stats = {"differ": 0, "units": 0, "alpha": 0.0, "vmean": 0.0, "meta": 0.0}
    for step in range(2):
        compare_step(nat, ref, model, kv, tuple(n - 1 + step for n in lengths), gen, stats, torch.bfloat16)


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """select.c built without AVX-512: the portable C path."""
    out = tmp_path_factory.mktemp("portable") / "select_portable.so"
    try:
        return build.compile_variant("select", build.SOURCES["select"], out, ("-mno-avx512f",))
    except RuntimeError as e:
        pytest.skip(f"cannot build the portable path: {str(e)[:200]}")


@pytest.mark.parametrize("policy", list(POLICIES))
def test_portable_path(policy, calibrations, portable_lib):
    for budget in ("1/16", "all"):
        run_case(policy, "3x3x64", budget, calibrations["3x3x64"], steps=2, lib=portable_lib)
    run_case(policy, "tiny", "1/4", calibrations["tiny"], steps=2, lib=portable_lib)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "streaming"])
def test_exact_ties_are_tolerated(policy, calibrations):
    """Keys repeated every 64 tokens: many scores tie exactly, the kernel breaks ties toward the
    lower index, torch.topk as it likes; the comparison accepts exactly those differences."""
    nat, ref, model = twins(policy, "3x3x64", "1/4", calibrations["3x3x64"])
    gen = torch.Generator().manual_seed(9)
    lengths = (2600, 333)                                  # (2600: the kernel's sampled bracket too)
    kv = feed_prefill((nat, ref), model, gen, lengths)
    for k, v in kv:
        k.copy_(k[:, :64].repeat(1, -(-k.shape[1] // 64), 1)[:, :k.shape[1]])
    for sid, n in enumerate(lengths):                      # refeed the periodic keys
        for p in (nat, ref):
            p.allocate(sid, n)
            p.append(1, sid, 0, kv[sid][0][:, :n - 1], kv[sid][1][:, :n - 1])
    stats = {"differ": 0, "units": 0, "alpha": 0.0, "vmean": 0.0, "meta": 0.0}
    for step in range(2):
        compare_step(nat, ref, model, kv, tuple(n - 1 + step for n in lengths), gen, stats)
    print(f"{policy}: {stats['differ']} of {stats['units']} units differ at exact ties")


@pytest.mark.parametrize("policy", list(POLICIES))
def test_threads(policy, calibrations):
    """Several OpenMP threads (scoring split in column chunks, tasks spread): the same results."""
    import kvoffload.kernels.select as sel

    old = sel.PAR_MIN_WORK
    sel.PAR_MIN_WORK = 0                                   # parallel whatever the work
    try:
        nat, ref, model = twins(policy, "3x3x64", "1/16", calibrations["3x3x64"])
        nat.threads = 2
        gen = torch.Generator().manual_seed(4)
        lengths = (3000, 40, 900)
        kv = feed_prefill((nat, ref), model, gen, lengths)
        stats = {"differ": 0, "units": 0, "alpha": 0.0, "vmean": 0.0, "meta": 0.0}
        compare_step(nat, ref, model, kv, tuple(n - 1 for n in lengths), gen, stats)
        assert nat._kernel.threads == 2 and nat._kernel.cfg.par_min_work == 0
    finally:
        sel.PAR_MIN_WORK = old


def test_reference_paths(calibrations, monkeypatch):
    """native=False, a subclass with its own scoring, and no kernel (no compiler,
    KVOFFLOAD_NO_KERNELS=1: build.load gives None) use PyTorch."""
    _, ref, model = twins("quest", "3x3x64", "1/4", None)
    gen = torch.Generator().manual_seed(5)
    feed_prefill((ref,), model, gen, (100,))
    q = torch.randn(1, model.num_heads, model.head_dim)
    kn = torch.randn(1, model.num_kv_heads, model.head_dim)
    ref.select_batch(1, (0,), q, (99,), kn, kn)
    assert ref._kernel is None                            # never even loaded

    from kvoffload.sparse.quest import Quest

    class Mine(Quest):
        def score(self, st, q, lo, hi, length):
            return -super().score(st, q, lo, hi, length)

    cfg = SparseConfig(sparse_policy="quest", sparse_budget="1/4", sparse_dense_layers="0")
    mine = Mine(cfg, model, BS, torch.device("cpu"))
    assert mine._load_kernel() is False

    import kvoffload.kernels.select as sel

    monkeypatch.setattr(sel, "load", lambda name: None)
    nok = make_policy(cfg, model, BS, torch.device("cpu"))
    feed_prefill((nok,), model, gen, (100,))
    got = nok.select_batch(1, (0,), q, (99,), kn, kn)
    assert nok._kernel is False and got[0].union(BS)[0].size > 0


def test_counters_match(calibrations):
    """SparseCounters from native selections (precomputed counts) = from the reference's."""
    for policy in ("sparf", "quest", "shadowkv"):
        nat, ref, model = twins(policy, "3x3x64", "1/4", calibrations["3x3x64"])
        gen = torch.Generator().manual_seed(11)
        lengths = (17, 200, 333)
        kv = feed_prefill((nat, ref), model, gen, lengths)
        cn, cr = SparseCounters(), SparseCounters()
        for step in range(3):
            starts = tuple(n - 1 + step for n in lengths)
            q = torch.randn(3, model.num_heads, model.head_dim, generator=gen)
            kn = torch.stack([k[:, s] for (k, _), s in zip(kv, starts)])
            vn = torch.stack([v[:, s] for (_, v), s in zip(kv, starts)])
            o = torch.randn(3, model.num_heads, model.head_dim, generator=gen)
            on = cn.finish(nat.select_batch(1, (0, 1, 2), q, starts, kn, vn), o.clone(), starts, BS, 8)
            orf = cr.finish(ref.select_batch(1, (0, 1, 2), q, starts, kn, vn), o.clone(), starts, BS, 8)
            assert torch.allclose(on, orf, atol=1e-5)
        assert (cn.steps, cn.context, cn.attended, cn.read) == (cr.steps, cr.context, cr.attended, cr.read)


def test_union_selection_is_lazy():
    """A Selection built from a union answers union() and the counts without per-head arrays,
    and derives them on demand."""
    blocks = np.array([0, 3, 5], np.int64)
    masks = np.array([[0xFFFF, 0xFFFF], [0x00F0, 0], [0, 0x8001]], np.uint64)
    sel = Selection(union=(blocks, masks), counts=(4, 32 + 4 + 2))
    assert sel._blocks is None and sel.union(16)[0] is blocks and sel.read_blocks() == 4
    assert [b.tolist() for b in sel.blocks] == [[0, 3], [0, 5]]
    assert [m.tolist() for m in sel.masks] == [[0xFFFF, 0x00F0], [0xFFFF, 0x8001]]
    whole = Selection(union=(blocks[:1], masks[:1]), whole=True, counts=(2, 32))
    assert whole.masks == [None, None] and whole.chosen_tokens(16) == 32
