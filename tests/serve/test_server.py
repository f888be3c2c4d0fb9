"""`kvoffload serve` end to end: the real `openai` client and raw HTTP against the server on a
loopback port (uvicorn in a thread), over a tiny random model."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from kvoffload.api import LLM
from kvoffload.config import SamplingParams, ServeConfig
from kvoffload.serve.app import create_app
from kvoffload.serve.runner import ServerThread

MODEL = "tiny"
TIMEOUT = 30


@pytest.fixture(scope="module")
def model_path(tiny_hf):
    return tiny_hf("llama3-rope")[1]


@pytest.fixture(scope="module")
def llm(model_path):
    """The served LLM: its engine belongs to the server's loop thread while a server runs."""
    llm = LLM(model_path, dtype="float32", prefill_chunk=16, max_num_seqs=8)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def ref(model_path):
    """The same model in the test's thread: references for what the server answers."""
    llm = LLM(model_path, dtype="float32", prefill_chunk=16, max_num_seqs=8)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def spare(model_path):
    """A second served LLM, for the tests that start their own server while ``server`` runs
    (one engine loop per LLM)."""
    llm = LLM(model_path, dtype="float32", prefill_chunk=16, max_num_seqs=8)
    yield llm
    llm.close()


def serve(llm, **cfg):
    return ServerThread(create_app(llm, ServeConfig(**cfg), MODEL))


@pytest.fixture(scope="module")
def server(llm):
    with serve(llm, max_queue=256) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


# ----------------------------------------------------------------------------- the openai client

def test_completion_greedy_equals_generate(ref, client):
    prompt = "The quick brown fox"
    want = ref.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12


def test_completion_stream_with_usage(ref, client):
    prompt = "Once upon a time"
    want = ref.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_token_ids_batch_and_n(ref, client):
    ids = [ref.encode("hello world"), ref.encode("abc")]
    refs = ref.generate(ids, SamplingParams(max_tokens=5, ignore_eos=True))
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [refs[0].text, refs[0].text, refs[1].text, refs[1].text]
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and r.usage.completion_tokens == 20


def test_sampling_seeded_is_reproducible(client):
    kw = {"model": MODEL, "prompt": "abc", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7,
          "extra_body": {"ignore_eos": True, "top_k": 50}}
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text


def test_chat_greedy_and_stream(ref, client):
    msgs = [{"role": "user", "content": "Hi there"}]
    want = ref.generate("Hi there", SamplingParams(max_tokens=8, ignore_eos=True), chat=True)[0]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)   # greedy: the top token


def test_echo_prompt_logprobs_match_teacher_forcing(ref, client):
    """What lm-eval's loglikelihood requests read: echo + logprobs, max_tokens 1 (or 0)."""
    import torch

    ids = ref.encode("the cat sat on the mat")
    lps = torch.log_softmax(ref.engine.prompt_logits(ids).float(), -1)            # [T, V]
    for max_tokens in (1, 0):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=2,
                                      echo=True)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(float(lps[i - 1, ids[i]]), abs=1e-4)
            assert max(lp.top_logprobs[i].values()) == pytest.approx(float(lps[i - 1].max()), abs=1e-4)
        assert r.choices[0].text.startswith(ref.tokenizer.decode(ids))
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    assert metric(server.url, "kvoffload_generation_tokens_total") >= 3
    assert metric(server.url, "kvoffload_time_to_first_token_seconds_count") >= 1
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("kvoffload_requests_waiting", "kvoffload_requests_running", "kvoffload_prompt_tokens_total",
                 "kvoffload_time_per_output_token_seconds_bucket", 'kvoffload_kv_bytes{tier="memory"}'):
        assert name in text


# ----------------------------------------------------------------------------- errors

def _post(url: str, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": "x" * 600}, "prompt"),                         # past the 512-token context
    ({"model": MODEL, "prompt": [[5, 99999]]}, "prompt"),                      # outside the vocabulary
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),          # 0 only with echo
])
def test_bad_parameters_are_400_naming_the_field(server, body, param):
    r = _post(server.url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"] or "").startswith(param) and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "\n" not in err["message"]


def test_malformed_json_wrong_model_and_big_body(server):
    r = _post(server.url, b'{"prompt": "x",')
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = _post(server.url, {"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = _post(server.url, {"model": MODEL, "messages": []}, "/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(server.url, {"model": MODEL, "prompt": "x" * (9 << 20)})
    assert r.status_code == 413
    assert httpx.get(server.url + "/nope", timeout=TIMEOUT).status_code == 404


def test_api_key(spare):
    with serve(spare, api_key="s3cret") as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        assert _post(s.url, body).status_code == 401
        assert _post(s.url, body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert _post(s.url, body, headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/health", timeout=TIMEOUT).status_code == 200


def test_queue_full_is_429(model_path):
    """2 places (1 running + 1 queued): with the engine paused, a third request is refused at once."""
    llm = LLM(model_path, dtype="float32", prefill_chunk=16, max_num_seqs=1)
    try:
        with serve(llm, max_queue=1) as s:
            loop = s.app.state.server.loop
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            with cf.ThreadPoolExecutor(2) as pool:
                with loop.paused():
                    held = [pool.submit(_post, s.url, body) for _ in range(2)]
                    deadline = time.monotonic() + TIMEOUT
                    while loop.pending < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    r = _post(s.url, body)
                    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                assert [f.result().status_code for f in held] == [200, 200]
            assert _post(s.url, body).status_code == 200
            assert metric(s.url, "kvoffload_requests_rejected_total") == 1
    finally:
        llm.close()


def test_request_timeout_frees_the_request(spare):
    with serve(spare, request_timeout=0.2) as s:
        loop = s.app.state.server.loop
        with cf.ThreadPoolExecutor(1) as pool:
            with loop.paused():
                f = pool.submit(_post, s.url, {"model": MODEL, "prompt": "x", "max_tokens": 2})
                time.sleep(0.5)
            r = f.result()
        assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
        deadline = time.monotonic() + TIMEOUT
        while loop.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.pending == 0 and not spare.engine.seqs


# ----------------------------------------------------------------------------- batching, cancellation

def test_concurrent_requests_are_batched_and_complete(server, ref):
    """A bounded load test: 200 requests from 16 clients, each complete and equal to its greedy reference."""
    prompts = [f"request {i}: " for i in range(8)]
    refs = {p: r.text for p, r in zip(prompts, ref.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True)))}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    before = metric(server.url, "kvoffload_requests_finished_total", '{reason="length"}') \
        if "kvoffload_requests_finished_total{reason=\"length\"}" in httpx.get(server.url + "/metrics").text else 0.0

    def one(i: int):
        p = prompts[i % len(prompts)]
        if i % 2:
            r = client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
            return p, r.choices[0].text, r.choices[0].finish_reason
        chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        return p, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - t0
    assert all(text == refs[p] and fin == "length" for p, text, fin in results)
    assert metric(server.url, "kvoffload_requests_finished_total", '{reason="length"}') - before == 200
    assert elapsed < 120


def test_disconnect_cancels_and_frees_kv(model_path, monkeypatch):
    """A stream whose client goes away: the request is aborted and its KV freed (measured in /metrics)."""
    llm = LLM(model_path, dtype="float32", prefill_chunk=16, max_num_seqs=4, kv_host_budget="64MiB")
    step = llm.engine.step

    def slow_step():                   # 400 tokens take 4 s or more: the stream is still going when it is cut
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    try:
        with serve(llm) as s:
            body = {"model": MODEL, "prompt": "a long one", "max_tokens": 400, "stream": True, "ignore_eos": True,
                    "temperature": 0}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert all(line.startswith("data: ") or not line for line in got)
                deadline = time.monotonic() + TIMEOUT
                while metric(s.url, "kvoffload_kv_chunks_used", '{tier="host"}') == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                held = metric(s.url, "kvoffload_kv_chunks_used", '{tier="host"}')
                assert held > 0
            # the client closed the connection: the request is aborted, its KV freed
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and (metric(s.url, "kvoffload_kv_chunks_used", '{tier="host"}') > 0
                                                   or metric(s.url, "kvoffload_requests_running") > 0):
                time.sleep(0.02)
            assert metric(s.url, "kvoffload_kv_chunks_used", '{tier="host"}') == 0
            assert metric(s.url, "kvoffload_requests_finished_total", '{reason="abort"}') == 1
            assert not llm.engine.seqs
    finally:
        llm.close()


def test_bench_serve_against_a_running_server(server, tmp_path, capsys):
    """`kvoffload bench serve --url`: every request completes; the report's numbers add up."""
    from kvoffload.cli.main import main

    out = tmp_path / "bench"
    assert main(["bench", "serve", "--url", server.url, "-p", "24", "-n", "5", "--num-prompts", "12",
                 "--concurrency", "4", "--ban-tokens", "0,2", "-o", str(out)]) == 0
    s = json.loads((tmp_path / "bench.json").read_text())
    assert s["completed"] == 12 and s["failed"] == 0 and s["config"]["model"] == MODEL
    assert s["config"]["ban_tokens"] == [0, 2]              # sent as logit_bias (ours ignores it)
    assert s["output_throughput"] == pytest.approx(12 * 5 / s["duration_s"])
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert "| TTFT |" in capsys.readouterr().out


def test_one_engine_loop_per_llm(server, llm):
    """A second loop on an engine that a server already steps would race it through the
    scheduler and take its outputs: it is refused, and the first one keeps serving."""
    from kvoffload.errors import KvoffloadError
    from kvoffload.serve.loop import EngineLoop

    with pytest.raises(KvoffloadError, match="already being served"):
        EngineLoop(llm.engine, 4).start()
    assert _post(server.url, {"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200
