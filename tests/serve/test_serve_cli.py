"""`kvoffload serve` as a process: SIGTERM drains the in-flight request and removes the offload files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")


def _start(args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "kvoffload.cli.main", "serve", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 120
    while url is None:
        line = proc.stderr.readline()
        if not line:
            proc.wait(10)
            pytest.fail("serve exited early: " + "".join(lines))
        lines.append(line)
        m = re.search(r"at (http://\S+)/v1", line)
        if m:
            url = m.group(1)
        assert time.monotonic() < deadline
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    return proc, url, lines


def test_sigterm_drains_in_flight_and_removes_offload_files(tiny_hf, tmp_path):
    _, path = tiny_hf("llama3-rope")
    off = tmp_path / "off"
    off.mkdir()
    proc, url, log = _start(["-m", path, "--port", "0", "--dtype", "float32", "--offload-dir", str(off),
                             "--kv-host-budget", "0", "--disk-workers", "0", "--served-model-name", "tiny"])
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 480, "ignore_eos": True, "temperature": 0,
                "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert [p.name for p in off.iterdir() if p.name.startswith("kvoffload-")]     # the disk tier's files
            proc.send_signal(signal.SIGTERM)                                             # mid-stream
            events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not list(off.iterdir()), "offload files left behind"
    text = "".join(log)
    assert "Traceback" not in text and "stopped by SIGTERM" in text


def test_port_in_use_is_one_line_error(tiny_hf):
    import socket

    _, path = tiny_hf("llama3-rope")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", "serve", "-m", path, "--port", str(port)],
                           capture_output=True, text=True, timeout=120, env={**os.environ}, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
