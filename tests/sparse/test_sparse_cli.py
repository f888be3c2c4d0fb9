"""``kvoffload calibrate`` and ``kvoffload sweep`` end to end on the tiny model."""

from __future__ import annotations

import json

import pytest

from kvoffload.cli.main import main


@pytest.fixture(scope="module")
def tiny_path(tiny_hf):
    return tiny_hf("qwen2")[1]


def test_calibrate_cli_is_deterministic(tiny_path, tmp_path, capsys):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    for out in (a, b):
        assert main(["calibrate", "-m", tiny_path, "-o", out, "--blocks", "2", "--block-tokens", "64",
                     "--dtype", "float32"]) == 0
    ja, jb = json.load(open(a)), json.load(open(b))
    assert ja["channels"] == jb["channels"] and ja["tokens"] == 128
    assert "wrote" in capsys.readouterr().out


def test_sweep_cli(tiny_path, tmp_path, capsys):
    cal = str(tmp_path / "c.json")
    assert main(["calibrate", "-m", tiny_path, "-o", cal, "--blocks", "1", "--block-tokens", "64"]) == 0
    out = str(tmp_path / "sweep")
    args = ["sweep", "agreement", "-m", tiny_path, "--dtype", "float32", "-L", "200", "--samples", "1",
            "--decode-tokens", "24", "--policies", "quest,double_sparsity", "--budgets", "all,1/4",
            "--sparse-calibration", cal, "-o", out]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = json.load(open(f"{out}/sweep.json"))
    full = [r for r in rows if r["budget"] == "all"]
    assert len(rows) == 4 and all(r["agree"] == 100.0 and r["read_fraction"] == 1.0 for r in full)
    quarter = {r["policy"]: r for r in rows if r["budget"] == "1/4"}
    assert quarter["quest"]["read_fraction"] < 0.5 and quarter["double_sparsity"]["read_fraction"] < 1.0
    assert "| quest | 1/4 |" in table
    n = len(open(f"{out}/sweep.jsonl").readlines())
    assert main(args) == 0                                   # resumed: nothing new to run
    assert len(open(f"{out}/sweep.jsonl").readlines()) == n


@pytest.mark.parametrize("args,words", [
    (["sweep", "ppl", "-L", "200"], "prefill-only"),
    (["sweep", "agreement", "-L", "200", "--policies", "nope"], "unknown sparse policy"),
    (["sweep", "agreement", "-L", "200", "--policies", "double_sparsity"], "kvoffload calibrate"),
    (["calibrate", "-o", "/nonexistent/dir/x.json"], "does not exist"),
])
def test_cli_errors_are_one_line(tiny_path, args, words, capsys):
    assert main(args + ["-m", tiny_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
