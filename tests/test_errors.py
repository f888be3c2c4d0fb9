"""Hostile and careless input (#19): each case is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_cli import assert_one_line_error, kvo


def _run(args: list, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", *args], input=stdin, capture_output=True,
                       timeout=300)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def test_invalid_utf8_prompt_argument(tiny_hf):
    _, path = tiny_hf("qwen2")
    assert_one_line_error(_run(["generate", "-m", path, "-n", "2", b"-p", b"caf\xe9 \xff"]), "not valid UTF-8")


def test_invalid_utf8_on_stdin(tiny_hf):
    _, path = tiny_hf("qwen2")
    assert_one_line_error(_run(["generate", "-m", path, "-n", "2", "-f", "-"], stdin=b"hello \xc3\x28"),
                          "stdin is not valid UTF-8")


@pytest.mark.parametrize("edit,word", [
    (lambda c: [c], "expected a JSON object, got a list"),
    (lambda c: {**c, "num_attention_heads": "four"}, "num_attention_heads must be an integer, got 'four'"),
    (lambda c: {**c, "num_attention_heads": None}, "num_attention_heads is null"),
    (lambda c: {**c, "num_key_value_heads": 0}, "num_key_value_heads must be >= 1"),
    (lambda c: {**c, "hidden_size": 64.5}, "hidden_size must be an integer"),
    (lambda c: {**c, "rms_norm_eps": "tiny"}, "rms_norm_eps must be a finite number"),
    (lambda c: {**c, "rope_scaling": [1]}, "rope_scaling must be an object"),
    (lambda c: {k: v for k, v in c.items() if k != "vocab_size"}, "lacks 'vocab_size'"),
])
def test_bad_hf_config_fields(tiny_hf, tmp_path, edit, word):
    _, path = tiny_hf("qwen2")
    bad = tmp_path / "model"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(edit(cfg)))
    assert_one_line_error(kvo("info", str(bad)), word)


@pytest.mark.parametrize("key,value,word", [
    ("add_head_count_kv", 0, "head_count_kv must be >= 1"),
    ("add_head_count", 0, "head_count must be >= 1"),
    ("add_block_count", 0, "block_count must be >= 1"),
])
def test_bad_gguf_header_fields(tiny_hf, write_gguf, tmp_path, monkeypatch, key, value, word):
    import gguf

    model, _ = tiny_hf("qwen2")
    monkeypatch.setattr(gguf.GGUFWriter, key, lambda self, n, _orig=getattr(gguf.GGUFWriter, key): _orig(self, value))
    path = str(tmp_path / "bad.gguf")
    write_gguf(model, path, "qwen2")
    assert_one_line_error(kvo("info", path), word)


@pytest.mark.parametrize("edit,word", [
    (lambda ch: ch.__setitem__(0, [[1000] + row[1:] for row in ch[0]]), "channels[0][0][0] = 1000 is out of range"),
    (lambda ch: ch[1][0].__setitem__(2, 1.5), "channels[1][0][2] must be an integer"),
    (lambda ch: ch[0][1].__setitem__(0, ch[0][1][1]), "channels[0][1] repeats a channel"),
    (lambda ch: ch.pop(), "must be a list of 3 layers"),
])
def test_bad_calibration_file(tiny_hf, tmp_path, edit, word):
    _, path = tiny_hf("qwen2")
    D = 16                                          # tiny models: hidden 64 / 4 heads; 3 layers, 2 KV heads
    channels = [[list(range(D)) for _ in range(2)] for _ in range(3)]
    edit(channels)
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"format": "kvoffload-channels/1", "channels": channels}))
    assert_one_line_error(kvo("generate", "-m", path, "-p", "hi", "-n", "2", "--sparse-policy", "double_sparsity",
                              "--sparse-calibration", str(f)), word)


def test_version_and_help():
    r = kvo("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvoffload ")
    r = kvo("--help")
    assert r.returncode == 0 and "kvoffload generate -p" in r.stdout and "KV cache" in r.stdout.split("\n\n")[1]


@pytest.mark.parametrize("flags,word", [
    (["--sparse-policy", "nope"], "unknown sparse policy"),
    (["--spec-draft-policy", "nope", "--speculate", "self"], "unknown sparse policy"),
    (["--kv-tiers", "host:1MiB,tape:1GiB"], "unknown KV tier"),
    (["--offload-dir", "FILE", "--kv-host-budget", "0"], "is not a directory"),
    (["--offload-dir", "MISSING", "--kv-host-budget", "0"], "does not exist"),
    (["--kv-host-budget", "100"], "smaller than one KV chunk"),
    (["--chat"], "chat template does not parse"),
])
def test_checks_that_need_no_model_run_before_it_loads(tiny_hf, tmp_path, monkeypatch, capsys, flags, word):
    from kvoffload.cli.main import main
    from kvoffload.model import loading

    _, path = tiny_hf("qwen2")
    bad = tmp_path / "model"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% for m in messages %}"}))
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / f) if f in ("FILE", "MISSING") else f for f in flags]

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loading, "load_model", no_load)
    monkeypatch.setattr("kvoffload.api.load_model", no_load)
    capsys.readouterr()                                  # (the fixture's own output)
    assert main(["generate", "-m", str(bad), "-p", "hi", "-n", "2", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and word in err, err
