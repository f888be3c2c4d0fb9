"""The CLI end to end: output, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kvo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvoffload.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_json_on_tiny_model(tiny_hf):
    _, path = tiny_hf("llama3-rope")
    r = kvo("generate", "-m", path, "--prompt", "hi", "-n", "6", "--ignore-eos", "--json", "--seed", "1",
            "--temperature", "0.8")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length"
    assert "tok/s" in r.stderr.splitlines()[-1]


def test_generate_streams_text(tiny_hf):
    _, path = tiny_hf("llama3-rope")
    r = kvo("generate", "-m", path, "--prompt", "hi", "-n", "4", "--ignore-eos", "--chat")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "decode" in r.stderr


def test_info(tiny_hf):
    _, path = tiny_hf("qwen2")
    r = kvo("info", path, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen2" and info["kv_heads"] == 2 and info["qkv_bias"] is True
    assert info["kv_bytes_per_token_fp16"] == 2 * 3 * 2 * 16 * 2


def test_missing_model_file(tmp_path):
    assert_one_line_error(kvo("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "x"), "not found")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a model" * 10)
    assert_one_line_error(kvo("generate", "-m", str(f), "-p", "x"), "not a GGUF")


def test_truncated_gguf(tiny_gguf, tmp_path):
    _, path = tiny_gguf("qwen2")
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 200):
        f = tmp_path / f"cut{cut}.gguf"
        f.write_bytes(data[:cut])
        assert_one_line_error(kvo("info", str(f)), "truncated")


def test_unsupported_architecture(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    d = tmp_path / "gpt"
    d.mkdir()
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(kvo("info", str(d)), "unsupported architecture", "gpt_neox")


def test_prompt_longer_than_context(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    f = tmp_path / "long.txt"
    f.write_text("z" * 600)       # byte-level tokens: 600 > 512 context
    assert_one_line_error(kvo("generate", "-m", path, "-f", str(f)), "context")


@pytest.mark.parametrize("flags,word", [(["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"),
                                        (["-n", "0"], "max_tokens"), (["--top-k", "-1"], "top_k")])
def test_invalid_sampling_values(tiny_hf, flags, word):
    _, path = tiny_hf("qwen2")
    assert_one_line_error(kvo("generate", "-m", path, "-p", "x", *flags), word)


def test_unknown_alias():
    assert_one_line_error(kvo("info", "no-such-model"), "not found")
