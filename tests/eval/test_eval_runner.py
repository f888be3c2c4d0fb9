"""The eval runner on a tiny model: decode-path agreement, resume, combined reports, CLI errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kvoffload.api import LLM
from kvoffload.cli.main import build_parser, main
from kvoffload.config import EngineConfig
from kvoffload.errors import ConfigError, InputError
from kvoffload.eval import runner
from kvoffload.eval.config import EvalConfig
from kvoffload.eval.runner import config_label, reference_config

LENGTHS = (300, 480)        # the tiny models' context is 512 tokens (bytes)


@pytest.fixture(scope="module")
def tiny(tiny_hf) -> str:
    return tiny_hf("qwen2")[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run on one thread (on a busy machine, spinning OpenMP threads cost 10x); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_teacher_forced_logits_follow_the_decode_path(tiny):
    """Prefill P tokens, decode the rest one by one: the same logits as a full teacher-forced prefill."""
    llm = LLM(tiny, dtype="float32", prefill_chunk=64)
    ids = llm.encode("The grass is green. The sky is blue. " * 6)[:200]
    full = llm.engine.prompt_logits(ids)                              # [T, V]
    tf = llm.engine.teacher_forced_logits(ids, 150)                   # [T - 150, V]
    assert tf.shape == (50, full.shape[1])
    assert (tf - full[149:-1]).abs().max() < 1e-4
    assert llm.engine.kv.stats().held == {"memory": 0}                # its KV is freed
    for bad in (0, 200):
        with pytest.raises(InputError):
            llm.engine.teacher_forced_logits(ids, bad)


def _cfg(out, tasks=("passkey", "ppl"), **kw) -> EvalConfig:
    return EvalConfig(tasks=tasks, lengths=LENGTHS, samples=kw.pop("samples", 2), output=str(out) if out else None,
                      decode_tokens=kw.pop("decode_tokens", 24), no_chat=True, **kw)


def _top1_kl(report, label):
    cells = {(c.metric, c.length): c.value for c in report.cells if c.task == "agreement" and c.config == label}
    return [cells[("top-1 %", n)] for n in LENGTHS], [cells[("KL", n)] for n in LENGTHS]


def test_dense_vs_dense_agrees_and_bf16_differs(tiny, tmp_path):
    fp32 = EngineConfig(model=tiny, dtype="float32")
    dense = runner.run(_cfg(tmp_path, ("agreement",), samples=1), fp32, progress=False)
    top1, kl = _top1_kl(dense, "dtype=float32")
    assert top1 == [100.0, 100.0] and max(kl) == 0.0
    bf16 = runner.run(_cfg(tmp_path, ("agreement",), samples=1, reference=("dtype=float32",)),
                      EngineConfig(model=tiny, dtype="bfloat16"), progress=False)
    top1, kl = _top1_kl(bf16, "dtype=bfloat16")
    assert min(kl) > 1e-4, kl                                        # a different configuration shows
    rows = {(r[2], r[3]) for r in bf16.rows()}                       # both configurations, one report
    assert rows == {(os.path.basename(tiny), "dtype=float32"), (os.path.basename(tiny), "dtype=bfloat16")}
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {r["reference"] for r in recs} == {"dtype=float32"}
    assert all(r["first_position"] == r["length"] - 24 and len(r["agree"]) == len(r["kl"]) == 24 for r in recs)
    by_pos = bf16.buckets()
    assert {b["config"] for b in by_pos} == {"dtype=float32", "dtype=bfloat16"}
    assert sum(x["tokens"] for x in by_pos[0]["buckets"]) == 2 * 24


def test_resumed_run_gives_the_same_table(tiny, tmp_path, monkeypatch):
    eng = EngineConfig(model=tiny, dtype="float32")
    whole = runner.run(_cfg(tmp_path / "whole"), eng, progress=False)

    real, calls = runner.run_ppl, []

    def dying(*a, **k):                       # killed in the middle of the 3rd ppl sample
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_ppl", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run(_cfg(tmp_path / "part"), eng, progress=False)
    monkeypatch.setattr(runner, "run_ppl", real)
    log = tmp_path / "part" / "samples.jsonl"
    done = log.read_text().splitlines()
    assert 0 < len(done) < 8
    with open(log, "a") as f:                 # and a torn last line, as a kill during the write leaves
        f.write('{"key": "torn')
    resumed = runner.run(_cfg(tmp_path / "part"), eng, progress=False)
    assert resumed.markdown() == whole.markdown()
    lines = log.read_text().splitlines()
    assert lines[:len(done)] == done and len(lines) == 8              # earlier samples kept, not rerun
    assert len({json.loads(x)["key"] for x in lines}) == 8
    again = runner.run(_cfg(tmp_path / "part"), eng, progress=False)   # nothing left to run
    assert again.markdown() == whole.markdown() and len(log.read_text().splitlines()) == 8


def test_label_reused_with_other_settings_is_refused(tiny, tmp_path):
    runner.run(_cfg(tmp_path, ("ppl",), samples=1, label="mine"), EngineConfig(model=tiny, dtype="float32"),
               progress=False)
    with pytest.raises(ConfigError, match="label 'mine'"):
        runner.run(_cfg(tmp_path, ("ppl",), samples=1, label="mine"), EngineConfig(model=tiny, dtype="bfloat16"),
                   progress=False)


def test_labels_and_reference_config():
    assert config_label(EngineConfig()) == "dense"
    assert config_label(EngineConfig(model="x.gguf", threads=2, cache_dir="/c")) == "dense"       # identity only
    assert config_label(EngineConfig(dtype="float32", quantization="none")) == "dtype=float32,quantization=none"
    ref = reference_config(EngineConfig(model="m", dtype="float32", max_num_seqs=3, scheduling="interleave"))
    assert ref == EngineConfig(model="m", dtype="float32")          # numerics kept, the rest at defaults
    ref = reference_config(EngineConfig(dtype="bfloat16"), ("dtype=float32", "kv-dtype=float32", "threads=none"))
    assert (ref.dtype, ref.kv_dtype, ref.threads) == ("float32", "float32", None)
    for bad in (("nope=1",), ("dtype",), ("prefill_chunk=abc",), ("kv_host_budget=lots",)):
        with pytest.raises(ConfigError):
            reference_config(EngineConfig(), bad)


def test_nested_kv_settings_label_and_reference():
    """KV placement (a nested config) is part of the label and is reset to dense in the reference."""
    cfg = EngineConfig(dtype="float32").replace(kv_host_budget="1MiB", block_size=32)
    assert config_label(cfg) == "dtype=float32,block_size=32,kv_host_budget=1048576"
    assert reference_config(cfg) == EngineConfig(dtype="float32")
    ref = reference_config(cfg, ("kv_host_budget=2MiB",))
    assert ref.kv.kv_host_budget == 2 << 20 and ref.kv.block_size == 16


def test_every_engine_flag_is_an_eval_flag():
    """Engine options reach `kvoffload eval` generically: a field added to EngineConfig appears here."""
    import dataclasses

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["eval"]
    dests = {a.dest for a in sub._actions}
    names = [(f.name, f) for f in dataclasses.fields(EngineConfig) if not f.metadata.get("nested")]
    names += [(f.name, f) for f in dataclasses.fields(EngineConfig().kv)]          # nested KV settings
    assert len(names) > 15
    for name, f in names:
        if f.metadata.get("cli"):
            assert name in dests, name


def test_cli_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["eval", "passkey,ppl", "-m", tiny, "-L", "300,480", "--samples", "1", "--no-chat",
               "--dtype", "float32", "-o", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| passkey | score |" in table and "| ppl | ppl |" in table and "dtype=float32" in table
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "results.png", "samples.jsonl"]
    data = json.loads((out / "results.json").read_text())
    assert {c["task"] for c in data["cells"]} == {"passkey", "ppl"} and "MIT" in data["corpora"]["kjv"]
    assert (out / "results.md").read_text() == table


@pytest.mark.parametrize("args, words", [
    (["eval", "nope"], ["unknown task 'nope'"]),
    (["eval", "passkey", "-L", "1x"], ["bad length '1x'"]),
    (["eval", "ppl", "-L", "1k", "--samples", "1"], ["beyond the context", "512"]),
    (["eval", "passkey", "-L", "300", "--depth", "1.5"], ["depth must be in [0, 1]"]),
])
def test_cli_errors_are_one_line(tiny, tmp_path, capsys, args, words):
    rc = main([*args, "-m", tiny, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("kvoffload: error: "), err
    for w in words:
        assert w in err[0]
    assert not (tmp_path / "o" / "samples.jsonl").exists()


def test_unwritable_output_dir(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["eval", "ppl", "-m", tiny, "-L", "300", "-o", str(blocker / "sub")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write to" in err[0], err


@pytest.mark.slow
def test_smollm2_finds_a_single_needle_at_1k(smollm2_gguf):
    """The real model, end to end through the chat template: RULER's niah_single at 1K."""
    report = runner.run(EvalConfig(tasks=("niah_single",), lengths=(1024,), samples=2), EngineConfig(),
                        progress=False)
    assert report.cells[0].value >= 50.0, report.markdown()
