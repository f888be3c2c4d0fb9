"""``kvoffload generate --speculate self`` and ``kvoffload spec-bench`` end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from kvoffload.cli.main import main


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


def test_generate_speculates(tiny_path, capsys):
    base = ["generate", "-m", tiny_path, "--dtype", "float32", "-p", "the quick brown fox " * 12, "-n", "24",
            "--ignore-eos", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--speculate", "self", "--num-speculative-tokens", "3", "--spec-draft-budget", "16",
                        "--kv-host-budget", "0", "--block-size", "8"]) == 0
    cap = capsys.readouterr()
    spec = json.loads(cap.out.strip().splitlines()[-1])
    assert spec["token_ids"] == plain["token_ids"]
    assert "speculation:" in cap.err and "acceptance" in cap.err


def test_spec_bench_cli(tiny_path, tmp_path, capsys):
    out = str(tmp_path / "sb")
    args = ["spec-bench", "-m", tiny_path, "--dtype", "float32", "-L", "200", "--gammas", "2,3",
            "--temperatures", "0,0.6", "--new-tokens", "12", "-r", "2", "--block-size", "8", "-o", out]
    assert main(args) == 0
    rows = json.load(open(f"{out}/summary.json"))
    names = {r["run"] for r in rows}
    assert {"plain T=0.0", "spec g=2 T=0.0", "spec g=3 T=0.6", "spec g=4 T=0.0 interval-16"} <= names
    greedy = [r for r in rows if r["gamma"] and r["temperature"] == 0]
    assert all(r["greedy_identical"] == 2 for r in greedy)             # fp32: the plain tokens, every rep
    assert all(0 <= r["acceptance"] <= 1 and r["speedup"] > 0 for r in greedy)
    assert "| 200 | spec g=2 T=0.0 |" in capsys.readouterr().out
    n = len(open(f"{out}/runs.jsonl").readlines())
    assert main(args) == 0                                              # resumed: nothing new to run
    assert len(open(f"{out}/runs.jsonl").readlines()) == n


@pytest.mark.parametrize("args,words", [
    (["spec-bench", "--gammas", "0", "-o", "x"], "--gammas"),
    (["spec-bench", "--gammas", "a,b", "-o", "x"], "comma-separated"),
    (["spec-bench", "--host-share", "2", "-o", "x"], "--host-share"),
    (["generate", "-p", "hi", "--speculate", "self", "--sparse-policy", "quest"], "--spec-draft-policy"),
    (["generate", "-p", "hi", "--speculate", "self", "--spec-draft-share", "300"], "fraction"),
])
def test_bad_flags_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
