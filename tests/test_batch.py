"""``kvoffload batch``: OpenAI batch lines in and out; a job killed at random moments resumes
and ends with every id exactly once, no torn line, the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

N = 24
DOCS = ["the first document is about rivers and the sea " * 3, "a second text, on mountains and snow " * 3]


def requests() -> list[dict]:
    out = []
    for i in range(N):
        doc = DOCS[i % 2]
        if i % 3 == 0:
            out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "tiny", "messages": [{"role": "system", "content": doc},
                                                               {"role": "user", "content": f"question {i}?"}],
                                 "max_tokens": 12, "temperature": 0, "ignore_eos": True}})
        else:
            out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "tiny", "prompt": doc + f"question {i}:", "max_tokens": 12,
                                 "temperature": 0, "ignore_eos": True}})
    return out


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def cmd(model: str, inp: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvoffload.cli.main", "batch", inp, "-o", out, "-m", model, "--dtype", "float32",
            "--block-size", "4", "--max-num-seqs", "2", *extra]


def complete_lines(path: str) -> int:
    """Lines written whole so far (0 before the file exists)."""
    try:
        return open(path, "rb").read().count(b"\n")
    except FileNotFoundError:
        return 0


def results(path: str) -> dict[str, dict]:
    data = open(path, "rb").read()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.decode().splitlines()]
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {r["custom_id"]: r for r in rows}


def test_batch_resumes_after_sigkill(tiny_hf, tmp_path):
    _, model = tiny_hf("qwen2")
    inp = write_jsonl(tmp_path / "in.jsonl", requests())
    ref_out = str(tmp_path / "ref.jsonl")
    t0 = time.monotonic()
    r = subprocess.run(cmd(model, inp, ref_out, "--no-progress"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    whole = time.monotonic() - t0
    ref = results(ref_out)
    assert sorted(ref) == sorted(f"req-{i}" for i in range(N))
    for v in ref.values():
        assert v["response"]["status_code"] == 200 and v["error"] is None
        body = v["response"]["body"]
        assert body["usage"]["completion_tokens"] == 12
        assert body["object"] in ("text_completion", "chat.completion")

    out = str(tmp_path / "out.jsonl")
    store = str(tmp_path / "store")
    rng = random.Random(17)
    kills, resumed = 0, 0
    for attempt in range(16):
        before = complete_lines(out)                  # (a kill may have torn the last line)
        resumed += 0 < before < N
        p = subprocess.Popen(cmd(model, inp, out, "--kv-store", store, "--no-progress"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        if attempt < 10:
            if attempt % 2 == 0:                      # in start-up or prefill, before a result
                time.sleep(rng.uniform(0.2, 0.5 * whole))
            else:                                     # just after a result is appended: mid-decode or mid-write
                deadline = time.monotonic() + 300
                while p.poll() is None and complete_lines(out) <= before and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        err = p.communicate(timeout=300)[1].decode()
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, err
    assert p.returncode == 0 and kills >= 3 and resumed >= 1, (kills, resumed, p.returncode)
    got = results(out)
    assert sorted(got) == sorted(ref)
    for cid in ref:
        a, b = got[cid]["response"]["body"], ref[cid]["response"]["body"]
        text = (lambda x: x["choices"][0].get("text") or x["choices"][0]["message"]["content"])
        assert text(a) == text(b), cid
    # the job is complete: a rerun does nothing
    r = subprocess.run(cmd(model, inp, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{N} already in" in r.stderr and results(out).keys() == got.keys()


def test_torn_last_line_is_removed_and_redone(tiny_hf, tmp_path):
    _, model = tiny_hf("qwen2")
    rows = requests()[:3]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    full = subprocess.run(cmd(model, inp, str(tmp_path / "ref.jsonl"), "--no-progress"), capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    lines = open(tmp_path / "ref.jsonl").read().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:25])                # one whole line, one cut by a kill
    r = subprocess.run(cmd(model, inp, str(out), "--no-progress"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 already in" in r.stderr
    assert sorted(results(str(out))) == sorted(x["custom_id"] for x in rows)


def test_bad_input_is_one_line_error(tmp_path, tiny_hf):
    _, model = tiny_hf("qwen2")
    good = requests()[0]
    cases = {
        "not json": ("{oops", "line 1 is not JSON"),
        "dup": ("\n".join([json.dumps(good)] * 2), "appears twice"),
        "url": (json.dumps({**good, "url": "/v1/embeddings"}), "url must be one of"),
        "body": (json.dumps({**good, "body": {"messages": []}}), "body.messages"),
        "no id": (json.dumps({k: v for k, v in good.items() if k != "custom_id"}), "custom_id must be"),
    }
    for name, (text, words) in cases.items():
        inp = tmp_path / f"{name}.jsonl"
        inp.write_text(text + "\n")
        out = tmp_path / f"{name}.out"
        r = subprocess.run(cmd(model, str(inp), str(out)), capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (name, r.stderr)
        assert not out.exists()                     # nothing written


def test_request_the_model_cannot_serve_gets_an_error_line(tmp_path, tiny_hf):
    _, model = tiny_hf("qwen2")
    long = {"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "x " * 600, "max_tokens": 4}}
    inp = write_jsonl(tmp_path / "in.jsonl", [long, requests()[1]])
    out = str(tmp_path / "out.jsonl")
    r = subprocess.run(cmd(model, inp, out, "--no-progress"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = results(out)
    assert got["too-long"]["response"]["status_code"] == 400
    assert "context" in got["too-long"]["response"]["body"]["error"]["message"]
    assert got["req-1"]["response"]["status_code"] == 200
    assert os.stat(out).st_mode & 0o777 == 0o600
