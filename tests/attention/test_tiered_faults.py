"""Faults and bad input around the tiered store: a killed disk worker is restarted from its
file with the output unchanged; bad budgets / directories are one-line errors; no offload
files are left behind after exit, an error, or Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import assert_one_line_error, kvo
from test_tiered import (  # tests/attention and tests/ are on pytest's path
    decode_with_fault,
    dense,  # noqa: F401  (a fixture)
)

from kvoffload import SamplingParams
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk_worker import DiskIOError, DiskShard, aligned_buffer


def test_killed_disk_worker_is_restarted_output_unchanged(dense):   # noqa: F811
    def kill(steps, disk):
        if steps in (8, 15):                          # mid-decode, each worker once
            victim = disk.workers[steps % 2]
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()

    ref, got, disk = decode_with_fault(dense, SamplingParams(max_tokens=24, ignore_eos=True), kill, disk_workers=2)
    assert got == ref
    assert disk.restarts == 2


def test_disk_full_is_a_clear_error():
    shard = DiskShard("/dev/full", BlockLayout(4, 1, 8, "float32"))
    with pytest.raises(DiskIOError, match="disk full"):
        shard.write(np.array([0]), memoryview(bytes(shard.layout.slot_bytes)), aligned_buffer(4096))


def test_disk_budget_exhausted_is_one_line(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    r = kvo("generate", "-m", path, "--prompt", "x" * 200, "-n", "4", "--kv-host-budget", "0",
            "--kv-disk-budget", "16KiB", "--offload-dir", str(tmp_path), "--block-size", "4", "--kv-chunk-blocks", "2")
    assert_one_line_error(r, "does not fit")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,word", [
    (["--kv-host-budget", "100"], "smaller than one KV chunk"),
    (["--kv-tiers", "host:1MiB,tape:1GiB"], "unknown KV tier 'tape'"),
    (["--kv-tiers", "host"], "bad --kv-tiers entry"),
    (["--kv-tiers", "host:1MiB", "--kv-host-budget", "1MiB"], "drop --kv-host-budget"),
    (["--kv-host-budget", "12XB"], "bad size"),
    (["--offload-dir", "/nonexistent/dir"], "does not exist"),
    (["--offload-dir", "/proc"], "cannot create"),
    (["--kv-disk-budget", "1000TiB", "--kv-host-budget", "0"], "exceeds"),
    (["--disk-workers", "-1", "--kv-host-budget", "0"], "disk_workers"),
    (["--disk-read-blocks", "3"], "disk_read_blocks must divide kv_chunk_blocks"),
])
def test_bad_kv_flags(tiny_hf, flags, word):
    _, path = tiny_hf("qwen2")
    assert_one_line_error(kvo("generate", "-m", path, "--prompt", "hi", "-n", "2", *flags), word)


def test_no_files_left_after_exit_and_ctrl_c(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    r = kvo("generate", "-m", path, "--prompt", "hello " * 20, "-n", "8", "--kv-host-budget", "0",
            "--offload-dir", str(tmp_path), "--block-size", "4")
    assert r.returncode == 0, r.stderr
    assert "KV per generated token (decode)" in r.stderr and os.listdir(tmp_path) == []
    assert "KV in prefill (" in r.stderr                 # the prefill's traffic apart from the decode's
    p = subprocess.Popen([sys.executable, "-m", "kvoffload.cli.main", "generate", "-m", path, "--prompt", "hi " * 50,
                          "-n", "100000", "--ignore-eos", "--kv-host-budget", "0", "--offload-dir", str(tmp_path),
                          "--block-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(f.endswith(".kv") for _, _, fs in os.walk(tmp_path) for f in fs):
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    time.sleep(1.0)                                    # decoding, with blocks on disk
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_bench_attention_runs_and_reports(tiny_hf, tmp_path):
    """The command works end to end (a smoke test: its numbers are for benchmarks, not asserted)."""
    _, path = tiny_hf("qwen2")
    out = tmp_path / "att"
    r = kvo("bench", "attention", "-m", path, "--context", "256", "-b", "2", "-r", "1", "-t", "1",
            "--peak-size", "8MiB", "--offload-dir", str(tmp_path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "| host (RAM) |" in r.stdout and "| disk (2 workers) |" in r.stdout
    assert (tmp_path / "att.json").exists() and sorted(os.listdir(tmp_path)) == ["att.json", "att.md"]


def test_bench_disk_runs_and_reports(tmp_path):
    """`bench disk` end to end (a smoke test: its numbers are for benchmarks, not asserted)."""
    out = tmp_path / "disk"
    r = kvo("bench", "disk", "--request-sizes", "4KiB,64KiB", "--queue-depths", "1,2", "--seconds", "0.05", "-r", "1",
            "--peak-size", "8MiB", "--offload-dir", str(tmp_path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "| 64 KiB |" in r.stdout and sorted(os.listdir(tmp_path)) == ["disk.json", "disk.md"]
    assert r.stdout.count("| 64 KiB |") == (2 if "aio (native AIO" in r.stdout else 1)    # a table per reader
    assert_one_line_error(kvo("bench", "disk", "--request-sizes", "1000"), "multiple of 4096")
    assert_one_line_error(kvo("bench", "disk", "--readers", "mmap"), "--readers")
