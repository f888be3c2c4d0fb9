"""``kvoffload bench serve``: load an OpenAI-compatible server (ours or any other) the way
``vllm bench serve`` does and report throughput, TTFT, TPOT and inter-token latency percentiles.

Prompts are random token ids of exactly ``input_len`` tokens (sent as token-id prompts to
``/v1/completions``; ``text_prompts`` sends random words instead, for servers that take only
text); each request streams ``output_len`` tokens with ``ignore_eos``. Requests start at
``request_rate`` per second (Poisson arrivals; ``inf``: all at once) with at most ``concurrency``
in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ServeBenchConfig:
    url: str                       # the server's root (http://host:port), without /v1
    model: str
    input_len: int = 512
    output_len: int = 64
    num_prompts: int = 64
    concurrency: int = 8
    request_rate: float = math.inf
    vocab_size: int = 32000        # token ids are drawn below this (and above 1000: no specials)
    text_prompts: bool = False
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0
    ban_tokens: tuple[int, ...] = ()   # sent as logit_bias -100: keeps a server without ignore_eos going


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)     # gaps between streamed chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _prompts(cfg: ServeBenchConfig) -> list:
    rng = random.Random(cfg.seed)
    if cfg.text_prompts:
        words = ["alpha", "river", "stone", "green", "cloud", "seven", "paper", "light", "house", "quick"]
        return [" ".join(rng.choice(words) for _ in range(cfg.input_len)) for _ in range(cfg.num_prompts)]
    lo = min(1000, cfg.vocab_size // 2)
    return [[rng.randrange(lo, cfg.vocab_size) for _ in range(cfg.input_len)] for _ in range(cfg.num_prompts)]


async def _one(client, cfg: ServeBenchConfig, prompt) -> RequestResult:
    body = {"model": cfg.model, "prompt": prompt, "max_tokens": cfg.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ban_tokens:
        body["logit_bias"] = {str(t): -100 for t in cfg.ban_tokens}
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return res
                now = time.perf_counter()
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    chunks += 1
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = res.output_tokens == cfg.output_len
        if not res.ok:
            res.error = f"{res.output_tokens} tokens instead of {cfg.output_len}"
    except Exception as e:       # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(cfg: ServeBenchConfig) -> tuple[list[RequestResult], float]:
    import httpx

    prompts = _prompts(cfg)
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    rng = random.Random(cfg.seed + 1)
    sem = asyncio.Semaphore(cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout, limits=limits) as client:
        async def bounded(p):
            async with sem:
                return await _one(client, cfg, p)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.ensure_future(bounded(p)))
            if math.isfinite(cfg.request_rate):
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(cfg: ServeBenchConfig, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or cfg.input_len for r in ok)
    ms = lambda xs: {"mean": 1e3 * statistics.fmean(xs) if xs else float("nan"),
                     **{f"p{q}": 1e3 * _pct(xs, q) for q in (50, 90, 99)}}
    return {
        "config": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                   for k, v in asdict(cfg).items() if k != "api_key"},
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": ms([x for r in ok for x in r.itl]),
        "e2e_ms": ms([r.e2e for r in ok]),
    }


def markdown(s: dict, name: str = "") -> str:
    c = s["config"]
    lines = [f"### {name or c['url']}: {c['num_prompts']} requests, {c['input_len']} prompt + {c['output_len']} "
             f"output tokens, concurrency {c['concurrency']}, rate {c['request_rate']}",
             "",
             f"completed {s['completed']}, failed {s['failed']}, {s['duration_s']:.2f} s; "
             f"{s['request_throughput']:.2f} req/s, output {s['output_throughput']:.1f} tok/s, "
             f"total {s['total_token_throughput']:.1f} tok/s",
             "",
             "| ms | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        v = s[key]
        lines.append(f"| {label} | {v['mean']:.1f} | {v['p50']:.1f} | {v['p90']:.1f} | {v['p99']:.1f} |")
    if s["errors"]:
        lines += ["", "errors: " + "; ".join(s["errors"])]
    return "\n".join(lines)


def run(cfg: ServeBenchConfig) -> dict:
    results, duration = asyncio.run(_run(cfg))
    return summarize(cfg, results, duration)
