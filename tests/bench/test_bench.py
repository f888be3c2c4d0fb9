"""The benchmark harness itself: test specs, ratio arithmetic, report formats, skipped peers."""

from __future__ import annotations

import json

import pytest

from kvoffload.bench.peers import LlamaCpp, PeerUnavailable
from kvoffload.bench.report import Report
from kvoffload.bench.runner import BenchConfig, build_engines
from kvoffload.bench.workloads import BenchTest, Sample, make_tests, parse_ints
from kvoffload.errors import ConfigError


def make_report() -> Report:
    r = Report(model="m.gguf", threads=2, reps=3, engines=["kvoffload", "peer"],
               labels={"kvoffload": "batched", "peer": "sequential"}, skipped={"other": "not installed"},
               rss_mib={"kvoffload": 300.0, "peer": 100.0}, peak_rss_mib=512.0)
    pp, tg = BenchTest("pp", 512), BenchTest("tg", 32, 4096, 16)
    for a, b in [(100.0, 50.0), (90.0, 30.0), (120.0, 40.0)]:
        r.add(pp, "kvoffload", Sample(a, 512 / a))
        r.add(pp, "peer", Sample(b, 512 / b))
    for a, b in [(10.0, 5.0), (12.0, 4.0), (8.0, 8.0)]:
        r.add(tg, "kvoffload", Sample(a))
        r.add(tg, "peer", Sample(b))
    return r


def test_names_and_contexts():
    assert BenchTest("pp", 512).name == "pp512" and BenchTest("pp", 512).context == 512
    t = BenchTest("tg", 32, 8192, 16)
    assert t.name == "tg32 @ d8192 ×16" and t.context == 8224


def test_make_tests_and_parsing():
    tests = make_tests([512, 2048], [32], [0, 4096], [1, 4])
    assert [t.name for t in tests][:2] == ["pp512", "pp2048"]
    assert len(tests) == 2 * 2 + 2 * 2
    with pytest.raises(ConfigError, match="integers"):
        parse_ints("12,x", "--depth")
    with pytest.raises(ConfigError, match="nothing to measure"):
        make_tests([0], [1], [0], [1])


def test_ratios_are_pairwise_not_ratio_of_medians():
    r = make_report()
    tg = BenchTest("tg", 32, 4096, 16)
    assert r.ratios(tg, "kvoffload", "peer") == [2.0, 3.0, 1.0]
    # median of pairwise ratios (2.0) differs from the ratio of medians (10 / 5 = 2.0 here, but
    # for pp: pairwise [2, 3, 3] -> 3.0 while medians give 100 / 40 = 2.5)
    pp = BenchTest("pp", 512)
    assert r.ratios(pp, "kvoffload", "peer") == [2.0, 3.0, 3.0]
    assert "3.00 (2.00–3.00)" in r.markdown()


def test_markdown_and_json_formats():
    r = make_report()
    md = r.markdown()
    assert "| test | kvoffload (batched) | peer (sequential) |" in md
    assert "| pp512 | 100.0 (90.0–120.0) | 40.0 (30.0–50.0) |" in md
    assert "skipped other: not installed" in md
    data = json.loads(r.to_json())
    assert data["skipped"] == {"other": "not installed"}
    row = next(x for x in data["results"] if x["name"] == "tg32 @ d4096 ×16" and x["engine"] == "peer")
    assert row["tok_s"] == [5.0, 4.0, 8.0] and row["median"] == 5.0 and row["test"]["batch"] == 16
    assert row["ttft_s"] == []
    pp = next(x for x in data["results"] if x["name"] == "pp512" and x["engine"] == "peer")
    assert pp["ttft_s"] == [512 / 50, 512 / 30, 512 / 40]


def test_time_to_first_token_table():
    md = make_report().markdown()
    assert "Time to first token" in md
    # median of 512/100, 512/90, 512/120 s and of 512/50, 512/30, 512/40 s, in ms
    assert "| pp512 | 5120.0 (4266.7–5688.9) | 12800.0 (10240.0–17066.7) |" in md
    assert "| tg32 @ d4096 ×16 | 10.0" not in md.split("Time to first token")[1]


def test_ours_reports_time_to_first_token(tiny_gguf):
    from kvoffload.bench.peers import Ours

    _, path = tiny_gguf("qwen2")
    ours = Ours("kvoffload", path, 1, dtype="float32")
    s = ours.run(BenchTest("pp", 8), [list(range(3, 11))])
    assert s.tok_s > 0 and s.ttft_s is not None
    assert s.ttft_s >= 8 / s.tok_s             # the first token comes after the prefill it includes
    assert ours.run(BenchTest("tg", 2, 4), [list(range(3, 7))]).ttft_s is None


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.png"
    assert make_report().plot(str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peer_is_skipped_with_reason(monkeypatch, tiny_gguf):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *a, **kw):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'", name="llama_cpp")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(PeerUnavailable, match="not installed"):
        LlamaCpp("llama.cpp", "x.gguf", 128, 1)
    _, path = tiny_gguf("qwen2")
    report = Report(model=path, threads=1, reps=1, engines=[], labels={}, skipped={}, rss_mib={})
    engines = build_engines(BenchConfig(path, (BenchTest("pp", 8),), vs=("llama.cpp",), dtype="float32"),
                            path, 64, report)
    assert [e.name for e in engines] == ["kvoffload"]
    assert "llama-cpp-python is not installed" in report.skipped["llama.cpp"]
    assert "skipped llama.cpp" in report.markdown()


def test_cli_rejects_unknown_peer():
    from kvoffload.cli.main import main

    assert main(["bench", "--vs", "vllm", "-p", "8"]) == 2


def test_offload_bench_context_is_capped_like_the_pp_tg_tests(capsys):
    from kvoffload.cli.bench import capped_context

    assert capped_context(4096, 32, 8192) == 4096
    assert capped_context(8192, 32, 8192) == 8160
    assert "capped at 8160" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no room"):
        capped_context(100, 8192, 8192)


def test_prefill_once_rounds_decode_the_same_tokens_as_one_generate(tiny_gguf):
    """A decode test's rounds on one prefill: each round decodes n tokens a sequence more on the
    same context, and together they are the tokens one generate of n x rounds gives."""
    from kvoffload.bench.peers import Ours
    from kvoffload.config import SamplingParams

    _, path = tiny_gguf("qwen2")
    ours = Ours("kvoffload", path, 1, dtype="float32")
    prompts = [list(range(3, 12)), list(range(20, 29))]
    test, rounds = BenchTest("tg", 3, 9, 2), 4
    dec = ours.start(test, prompts, rounds)
    eng, sids = dec.eng, list(dec.sids)
    made = [len(eng.seqs[s].output_ids) for s in sids]
    for _ in range(rounds):
        assert dec.round().tok_s > 0
        now = [len(eng.seqs[s].output_ids) for s in sids]
        assert [b - a for a, b in zip(made, now)] == [test.n] * len(sids)
        made = now
    got = [list(eng.seqs[s].output_ids) for s in sids]
    dec.close()
    assert not eng.has_unfinished() and not eng.seqs
    want = ours.llm.generate(prompts,
                             SamplingParams(max_tokens=test.n * rounds + 1, ignore_eos=True))
    assert got == [o.token_ids for o in want]
    cut = ours.start(test, prompts, rounds)             # closed after one round of four: all freed
    cut.round()
    cut.close()
    assert not eng.has_unfinished() and not eng.seqs


def test_prefill_once_run_alternates_rounds_and_says_so(tiny_gguf):
    from kvoffload.bench.runner import run

    _, path = tiny_gguf("qwen2")
    tests = (BenchTest("pp", 8), BenchTest("tg", 2, 8, 2))
    report = run(BenchConfig(path, tests, reps=3, threads=1, dtype="float32",
                             configs=(("fp32-kv", {"kv_dtype": "float32"}),), prefill_once=True), progress=False)
    for t in tests:
        for e in ("kvoffload", "fp32-kv"):
            assert len(report.cells[(t.name, e)].samples) == 3
    assert len(report.ratios(tests[1], "kvoffload", "fp32-kv")) == 3
    md = report.markdown()
    assert "3 rounds of n tokens on one prefill per engine" in md
    assert json.loads(report.to_json())["prefill_once"] is True


def test_prefill_once_with_llama_cpp_needs_batch_1():
    from kvoffload.cli.main import main

    assert main(["bench", "--prefill-once", "--vs", "llama.cpp", "-p", "0", "-n", "4", "-b", "2"]) == 2
    with pytest.raises(ValueError, match="batch 1"):
        LlamaCpp.start(object.__new__(LlamaCpp), BenchTest("tg", 2, 4, 2), [[1, 2], [3, 4]], 2)


def test_rounds_when_sequences_start_decoding_at_different_steps(tiny_gguf):
    """Under interleaved scheduling a sequence decodes while another still prefills, so it
    reaches its max_tokens a round early: the last round ends when every sequence is done,
    and all rounds together are still the tokens of one generate."""
    from kvoffload.bench.peers import Ours
    from kvoffload.config import SamplingParams

    _, path = tiny_gguf("qwen2")
    ours = Ours("kvoffload", path, 1, dtype="float32", scheduling="interleave", prefill_chunk=4)
    prompts = [list(range(3, 15)), list(range(20, 32)), list(range(40, 52))]
    test, rounds = BenchTest("tg", 3, 12, 3), 3
    dec = ours.start(test, prompts, rounds)
    eng, sids = dec.eng, list(dec.sids)
    assert len({len(eng.seqs[s].output_ids) for s in sids}) > 1      # staggered: the case under test
    for _ in range(rounds):
        assert dec.round().tok_s > 0
    assert all(eng.seqs[s].status.value == "finished" for s in sids)
    got = [list(eng.seqs[s].output_ids) for s in sids]
    dec.close()
    want = ours.llm.generate(prompts, SamplingParams(max_tokens=test.n * rounds + 1, ignore_eos=True))
    assert got == [o.token_ids for o in want]
