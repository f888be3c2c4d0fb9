"""``--kv-store`` across processes and ``kvoffload store ls | du | verify | prune``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROMPT = "a document that several processes ask about: " + "lorem ipsum dolor sit amet " * 6


def kvo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvoffload.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_prefix_reused_by_a_new_process_and_store_commands(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    store = str(tmp_path / "store")
    common = ("generate", "-m", path, "--dtype", "float32", "--block-size", "4", "-n", "6", "--ignore-eos", "--json")
    ref = kvo(*common, "-p", PROMPT)
    first = kvo(*common, "-p", PROMPT, "--kv-store", store)
    second = kvo(*common, "-p", PROMPT, "--kv-store", store, "--kv-host-budget", "4KiB", "--disk-workers", "0",
                 "--kv-chunk-blocks", "2")
    for r in (ref, first, second):
        assert r.returncode == 0, r.stderr
    out = [json.loads(r.stdout.strip().splitlines()[-1]) for r in (ref, first, second)]
    assert out[0]["token_ids"] == out[1]["token_ids"] == out[2]["token_ids"]
    n = out[0]["prompt_tokens"]
    assert out[1]["reused_tokens"] == 0 and out[2]["reused_tokens"] == (n - 1) // 4 * 4
    assert "from the KV store" in second.stderr and "blocks reused" in second.stderr

    r = kvo("store", "ls", store)
    assert r.returncode == 0 and "blocks" in r.stdout and os.path.basename(path) in r.stdout, r.stdout + r.stderr
    blocks = n // 4
    assert f"{blocks} blocks, 1 prompts' first blocks" in r.stdout
    r = kvo("store", "ls", store, "--blocks")
    assert r.returncode == 0 and len([ln for ln in r.stdout.splitlines() if "parent" in ln]) == blocks
    r = kvo("store", "du", store)
    assert r.returncode == 0 and f"{blocks} blocks" in r.stdout
    r = kvo("store", "verify", store)
    assert r.returncode == 0 and f"{blocks} blocks checked, 0 damaged" in r.stdout, r.stdout + r.stderr

    # damage one block: verify finds it (exit 1), prune removes it and the blocks it led to
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(store, "blocks")) for f in fs)
    from kvoffload.kv.persist.store import BlockDir

    d = BlockDir(store)
    by_parent = {h.parent.hex(): k for k, h in d.headers()}
    root = by_parent["00" * 32]
    second_block = by_parent[root]
    victim = d.file_of(second_block)
    assert victim in files
    data = bytearray(open(victim, "rb").read())
    data[-1] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    r = kvo("store", "verify", store)
    assert r.returncode == 1 and "checksum fails" in r.stdout and "1 damaged" in r.stdout
    r = kvo("store", "prune", store)
    assert r.returncode == 0 and f"removed 1 damaged, {blocks - 2} unreachable" in r.stdout, r.stdout
    r = kvo("store", "prune", store, "--max-bytes", "0")
    assert r.returncode == 0 and "0 blocks" in r.stdout
    r = kvo("store", "ls", store)
    assert r.stdout.strip() == "empty"


def test_store_command_errors(tmp_path):
    r = kvo("store", "ls", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    (tmp_path / "plain").mkdir()
    r = kvo("store", "du", str(tmp_path / "plain"))
    assert r.returncode == 2 and "not a kvoffload KV store" in r.stderr and "Traceback" not in r.stderr
    r = kvo("store", "prune", str(tmp_path / "plain2"), "--max-bytes", "lots")
    assert r.returncode == 2 and "bad size" in r.stderr


def test_store_help_lists_commands():
    r = kvo("store", "--help")
    assert r.returncode == 0
    for c in ("ls", "du", "verify", "prune"):
        assert c in r.stdout
