"""Hardening of the disk tier (#19): isolated worker processes, a hung worker restarted like a
dead one, SIGTERM / SIGHUP cleaning up like Ctrl-C, stale directories of killed runs removed."""

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
from kvoffload.errors import ConfigTypeError, InputError, KvoffloadError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers import disk
from kvoffload.kv.tiers.disk import ProcessWorker, WorkerError, make_offload_dir
from kvoffload.kv.tiers.disk_worker import WorkerIO, WriteBlocks

LAYOUT = BlockLayout(4, 1, 8, "float32", 2)


def _worker(directory, timeout: float = 60.0) -> ProcessWorker:
    return ProcessWorker(os.path.join(directory, "shard-0.kv"), LAYOUT, 1, 1, WorkerIO(), native=False, timeout=timeout)


def _roundtrip(w: ProcessWorker) -> None:
    data = np.arange(2 * LAYOUT.slot_bytes, dtype=np.uint8).tobytes()
    w.write(WriteBlocks(np.array([3, 0]), data))
    w.submit("read", np.array([0, 3]))
    got = w.collect()
    sb = LAYOUT.slot_bytes
    assert got == data[sb:] + data[:sb]


def test_worker_imports_nothing_from_the_working_directory_or_environment(tmp_path, monkeypatch):
    """A numpy.py, a sitecustomize.py, a usercustomize.py and a kvoffload/ package in the working
    directory and on PYTHONPATH are never run by a disk worker."""
    plant = tmp_path / "plant"
    marker = tmp_path / "ran"
    marker.mkdir()
    (plant / "kvoffload").mkdir(parents=True)
    code = f"import os; open(os.path.join({str(marker)!r}, __name__), 'w').close()\n"
    for name in ("numpy.py", "sitecustomize.py", "usercustomize.py", "kvoffload/__init__.py"):
        (plant / name).write_text(code)
    monkeypatch.chdir(plant)
    monkeypatch.setenv("PYTHONPATH", str(plant))
    monkeypatch.setenv("PYTHONSTARTUP", str(plant / "numpy.py"))
    offload = tmp_path / "offload"
    offload.mkdir()
    w = _worker(str(offload))
    try:
        _roundtrip(w)
    finally:
        w.close()
    assert os.listdir(marker) == []


def test_hung_worker_is_restarted_output_unchanged(dense):   # noqa: F811
    def stop(steps, tier):
        if steps == 8:                                    # mid-decode: the worker stops answering
            os.kill(tier.workers[1].proc.pid, signal.SIGSTOP)

    ref, got, tier = decode_with_fault(dense, SamplingParams(max_tokens=16, ignore_eos=True), stop,
                                       disk_workers=2, disk_worker_timeout=1.0)
    assert got == ref
    assert tier.restarts == 1 and tier.workers[1].hung == 1


def test_hung_worker_past_the_restart_limit_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "MAX_RESTARTS", 0)
    w = _worker(str(tmp_path), timeout=0.5)
    try:
        os.kill(w.proc.pid, signal.SIGSTOP)
        w.submit("read", np.array([0]))
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"failed 1 times, 1 of them hung \(no answer within 0.5 s\)"):
            w.collect()
        assert time.monotonic() - t0 < 5
        assert not w.alive
    finally:
        w.close()


def test_worker_dying_while_starting_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "_worker_command", lambda args: [sys.executable, "-c", "import sys; sys.exit('no luck')"])
    with pytest.raises(WorkerError, match="exited while starting: no luck"):
        _worker(str(tmp_path))


def _start_generate(path: str, offload: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvoffload.cli.main", "generate", "-m", path, "--prompt", "hi " * 50,
                             "-n", "100000", "--ignore-eos", "--kv-host-budget", "0", "--offload-dir", offload,
                             "--block-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(p: subprocess.Popen, offload) -> None:
    deadline = time.time() + 120
    while not any(f.endswith(".kv") for _, _, fs in os.walk(offload) for f in fs):
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    time.sleep(0.5)                                       # decoding, with blocks on disk


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up(tiny_hf, tmp_path, sig):
    _, path = tiny_hf("qwen2")
    p = _start_generate(path, str(tmp_path))
    _wait_for_shards(p, tmp_path)
    pids = [int(open(os.path.join(tmp_path, d, disk.LOCK_FILE)).read()) for d in os.listdir(tmp_path)]
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {sig.name}" in err, err
    assert os.listdir(tmp_path) == []
    assert pids == [p.pid]


def test_sigkill_leaves_a_directory_the_next_run_removes(tiny_hf, tmp_path):
    _, path = tiny_hf("qwen2")
    p = _start_generate(path, str(tmp_path))
    _wait_for_shards(p, tmp_path)
    p.kill()
    p.communicate(timeout=60)
    (stale,) = os.listdir(tmp_path)
    deadline = time.time() + 30                           # its workers see the socket close and exit
    r = kvo("generate", "-m", path, "--prompt", "hello", "-n", "2", "--kv-host-budget", "0",
            "--offload-dir", str(tmp_path), "--block-size", "4")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "left by killed runs" in ln]
    assert len(lines) == 1 and stale in lines[0], r.stderr
    assert os.listdir(tmp_path) == [] and time.time() < deadline + 300


def test_running_owner_keeps_its_directory(tmp_path):
    """Only directories whose owner is gone are removed: not ours while we run, not one without
    a lock file (being made, or from an older kvoffload)."""
    mine = make_offload_dir(str(tmp_path), None)
    lockless = tmp_path / "kvoffload-older"
    lockless.mkdir()
    make = [sys.executable, "-c", "from kvoffload.kv.tiers.disk import make_offload_dir as m; "
            f"print(m({str(tmp_path)!r}, None))"]      # exits without cleaning up, as if killed
    first = subprocess.run(make, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    second = subprocess.run(make, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("\n") == 1 and first.stdout.strip() in second.stderr, second.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(d.strip()) for d in
                                                  (mine, str(lockless), second.stdout))
    disk._cleanup([], mine)


@pytest.mark.parametrize("flags,word", [
    (["--offload-dir", "FILE", "--kv-host-budget", "0"], "is not a directory"),
    (["--kv-host-budget", "-5MiB"], "bad size '-5MiB'"),
    (["--disk-worker-timeout", "0"], "disk_worker_timeout"),
    (["--sparse-policy", "nope"], "unknown sparse policy"),
])
def test_fast_one_line_errors(tiny_hf, tmp_path, flags, word):
    """Checks that need no model fail before it loads."""
    _, path = tiny_hf("qwen2")
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    assert_one_line_error(kvo("generate", "-m", path, "--prompt", "hi", "-n", "2", *flags), word)


def test_failed_generate_leaves_the_engine_as_it_was(dense):   # noqa: F811
    eng = dense.engine
    too_long = list(range(600))                                   # the tiny model's context is 512
    with pytest.raises(KvoffloadError, match="context"):
        dense.generate(["hello", "world", too_long], SamplingParams(max_tokens=2))
    assert eng.seqs == {} and not eng.has_unfinished()
    with pytest.raises(InputError, match="not valid UTF-8"):
        dense.generate(["fine", "bad \udcff"], SamplingParams(max_tokens=2))
    assert eng.seqs == {} and not eng.has_unfinished()
    assert len(dense.generate("hi", SamplingParams(max_tokens=2))) == 1


@pytest.mark.parametrize("call,words", [
    (lambda llm: llm.generate("hi", {"max_tokens": 2}), ["params", "SamplingParams", "dict"]),
    (lambda llm: llm.generate(42), ["prompts", "int"]),
    (lambda llm: SamplingParams(temperature="hot"), ["temperature", "a number", "'hot'"]),
    (lambda llm: SamplingParams(max_tokens=2.5), ["max_tokens", "an int"]),
    (lambda llm: llm.config.replace(threads="two"), ["threads", "an int or None", "'two'"]),
    (lambda llm: llm.config.replace(disk_workers="2"), ["disk_workers", "an int"]),
])
def test_wrong_types_name_the_field(dense, call, words):   # noqa: F811
    with pytest.raises(ConfigTypeError) as e:
        call(dense)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert isinstance(e.value, TypeError) and dense.engine.seqs == {}


def test_token_ids_may_be_numpy_integers(dense):   # noqa: F811
    """Token ids from numpy (``list(np.array(...))``) are ids like Python ints; floats and
    booleans are not."""
    import numpy as np

    ids = dense.encode("hello world")
    p = SamplingParams(max_tokens=3)
    assert dense.generate([list(np.array(ids))], p)[0].token_ids == dense.generate([ids], p)[0].token_ids
    for bad in ([1.0, 2.0], [True, 3]):
        with pytest.raises(ConfigTypeError, match="token ids"):
            dense.generate([bad], p)


def test_generate_after_close_is_a_clear_error(tiny_hf):
    from kvoffload import LLM

    _, path = tiny_hf("qwen2")
    llm = LLM(path, dtype="float32", kv_tiers="disk:none", block_size=4)
    assert llm.generate("hi", SamplingParams(max_tokens=2))[0].token_ids
    llm.close()
    with pytest.raises(KvoffloadError, match="closed"):
        llm.generate("hi", SamplingParams(max_tokens=2))
    with pytest.raises(KvoffloadError, match="closed"):
        list(llm.stream("hi"))
    assert llm.engine.seqs == {} and not llm.engine.has_unfinished()
    with pytest.raises(ConfigTypeError, match="threads must be an int"):
        LLM(path, threads="two")


def test_cache_dir_governs_kernels_and_workers(tmp_path, monkeypatch):
    from kvoffload import paths
    from kvoffload.kernels import build
    from kvoffload.model import registry

    monkeypatch.setenv("KVOFFLOAD_CACHE", str(tmp_path / "env"))
    assert build._cache_dir() == tmp_path / "env" / "kernels"
    paths.set_cache_dir(str(tmp_path / "flag"))
    try:
        assert build._cache_dir() == tmp_path / "flag" / "kernels"
        assert registry.default_cache_dir() == str(tmp_path / "flag")
        assert disk._worker_env()["KVOFFLOAD_CACHE"] == str(tmp_path / "flag")
    finally:
        paths.set_cache_dir(None)
    assert build._cache_dir() == tmp_path / "env" / "kernels"
