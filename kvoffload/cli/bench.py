"""``kvoffload bench``: prefill/decode speed beside llama.cpp and HF transformers (llama-bench style)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from kvoffload.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill (ppN) and decode (tgN @ dD) throughput, optionally vs peers; "
                                     "'bench attention': decode attention bandwidth per KV tier; 'bench offload': "
                                     "an end-to-end job with the KV spilled to disk; 'bench disk': O_DIRECT read "
                                     "throughput against request size and queue depth",
                       description="speed (default): each test is repeated --reps times after a warm-up, engines "
                                   "interleaved; reports medians (min-max), pairwise ratios and RSS. attention: "
                                   "decode attention per tier (host RAM, disk workers) as effective bandwidth beside "
                                   "the measured peak. offload: a batch whose KV is many times --kv-host-budget, "
                                   "against the same job in memory, with the disk-bound step time. disk: random "
                                   "O_DIRECT reads through the disk workers' I/O path, GB/s per request size and "
                                   "requests in flight.")
    p.add_argument("kind", nargs="?", default="speed", choices=("speed", "attention", "offload", "disk", "serve"))
    p.add_argument("-m", "--model", default=None, help="GGUF file or alias (default: embedded SmolLM2)")
    p.add_argument("-p", "--n-prompt", default="512", help="prefill tests: prompt lengths (comma-separated)")
    p.add_argument("-n", "--n-gen", default="32", help="decode tests: tokens generated (comma-separated)")
    p.add_argument("-d", "--depth", default="0", help="decode tests: context already in the cache")
    p.add_argument("-b", "--batch", default="1", help="sequences run together (comma-separated)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions after the warm-up")
    p.add_argument("--prefill-once", action="store_true",
                   help="decode tests: prefill each engine once, then --reps rounds of -n tokens on that context, "
                        "engines alternating (pairs of samples seconds apart, no prefill per repetition; the "
                        "context grows by -n a round; llama.cpp needs -b 1)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--vs", default="", help="peers to run side by side: llama.cpp, transformers (comma-separated)")
    p.add_argument("--dtype", default="auto", help="kvoffload compute dtype")
    p.add_argument("-q", "--quantization", default="auto", help="kvoffload decode weight format")
    p.add_argument("--config", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                   help="speed: one more kvoffload engine, run side by side, with these engine settings, e.g. "
                        "'quest-1/16:sparse_policy=quest,sparse_budget=1/16' (repeatable)")
    p.add_argument("--hf-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    g = p.add_argument_group("attention / offload")
    g.add_argument("--context", type=int, default=None, help="tokens per sequence (attention: 8192, offload: 4096)")
    g.add_argument("--kv-host-budget", default="32MiB", help="offload: host RAM budget of the offloaded run")
    g.add_argument("--disk-workers", type=int, default=2, help="disk worker processes")
    g.add_argument("--offload-dir", default=None, help="where disk files go (default: system temp dir)")
    g.add_argument("--tiers", default="host,disk", help="attention: tiers to measure")
    g.add_argument("--kv-dtype", default="bfloat16", help="attention: KV dtypes measured side by side, the first the "
                   "baseline of the speed-ups (comma-separated: bfloat16, float16, float32, int8, int4)")
    g.add_argument("--kv-group-size", type=int, default=0, help="attention: value group of int8 / int4 blocks (0 = the whole head)")
    g.add_argument("--block-size", type=int, default=16, help="attention: tokens per KV block")
    g.add_argument("--peak-size", default="1GiB", help="buffer / file size for measuring the peak bandwidths")
    g.add_argument("--no-variants", action="store_true", help="offload: skip the runs without each overlap")
    g.add_argument("--request-sizes", default="4KiB,12KiB,16KiB,64KiB,192KiB,1MiB", help="disk: request sizes")
    g.add_argument("--queue-depths", default="1,2,4,8,16,32", help="disk: requests in flight")
    g.add_argument("--seconds", type=float, default=0.5, help="disk: time per (size, depth) cell")
    g.add_argument("--readers", default="threads,aio", help="disk: I/O paths to measure (threads, aio)")
    g = p.add_argument_group("serve (streams /v1/completions; -p: prompt tokens, -n: output tokens)")
    g.add_argument("--url", default=None, help="serve: an OpenAI-compatible server's root, e.g. http://127.0.0.1:8000 "
                                               "(default: start kvoffload's own on a free loopback port)")
    g.add_argument("--served-model", default=None, help="serve: the model id to send (default: the server's first)")
    g.add_argument("--api-key", default=None, help="serve: bearer key for --url")
    g.add_argument("--concurrency", type=int, default=8, help="serve: requests in flight at most")
    g.add_argument("--request-rate", type=float, default=math.inf, help="serve: requests started per second "
                                                                        "(Poisson; default inf: all at once)")
    g.add_argument("--num-prompts", type=int, default=64, help="serve: requests in all")
    g.add_argument("--text-prompts", action="store_true", help="serve: random words instead of token-id prompts")
    g.add_argument("--ban-tokens", default="", help="serve: token ids sent with logit_bias -100, for a server that "
                   "ignores ignore_eos (llama-cpp-python: the model's end tokens, SmolLM2's are 0,2)")
    g.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE",
                   help="serve: an engine setting of the server started here, e.g. max_num_seqs=16 (repeatable)")
    p.add_argument("-o", "--output", default=None,
                   help="write PREFIX.md, PREFIX.json and PREFIX.png (default: print the table only)")
    p.set_defaults(run=run)


def parse_configs(items: list[str]) -> tuple[tuple[str, dict], ...]:
    """``NAME:FIELD=VALUE,FIELD=VALUE`` -> ((NAME, {field: value}), ...)."""
    from kvoffload.config import EngineConfig, parse_overrides

    out = []
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--config {item!r}: expected NAME:FIELD=VALUE,...")
        # commas separate settings, except inside a value (sparse_dense_layers=0,1)
        settings = parse_overrides([x for x in re.split(r",(?=\s*[A-Za-z_][\w-]*=)", rest) if x.strip()], "--config")
        EngineConfig().replace(**settings)                      # bad values fail here, in one line
        out.append((name.strip(), settings))
    if len({n for n, _ in out} | {"kvoffload"}) != len(out) + 1:
        raise ConfigError("--config names must be distinct (and not 'kvoffload')")
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    if args.kind == "serve":
        return _run_serve(args)
    if args.kind != "speed":
        return _run_kv(args)
    from kvoffload.bench.workloads import make_tests, parse_ints

    tests = make_tests(parse_ints(args.n_prompt, "--n-prompt"), parse_ints(args.n_gen, "--n-gen"),
                       parse_ints(args.depth, "--depth"), parse_ints(args.batch, "--batch"))
    vs = tuple(v.strip() for v in args.vs.split(",") if v.strip())
    from kvoffload.bench.runner import PEERS, BenchConfig
    from kvoffload.bench.runner import run as run_bench

    bad = [v for v in vs if v not in PEERS]
    if bad:
        raise ConfigError(f"unknown peer {bad[0]!r} for --vs (known: {', '.join(PEERS)})")
    if args.reps < 1:
        raise ConfigError("--reps must be >= 1")
    if args.prefill_once and "llama.cpp" in vs and any(t.batch > 1 for t in tests if t.kind == "tg"):
        raise ConfigError("--prefill-once with --vs llama.cpp needs -b 1 (its binding decodes one sequence at a time)")
    if args.output:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ConfigError(f"--output: directory {parent} does not exist")
    report = run_bench(BenchConfig(args.model, tuple(tests), args.reps, args.threads, vs, args.dtype,
                                   args.quantization, args.hf_dtype, parse_configs(args.config),
                                   args.prefill_once))
    md = report.markdown()
    print(md)
    if args.output:
        with open(args.output + ".md", "w") as f:
            f.write(md)
        with open(args.output + ".json", "w") as f:
            f.write(report.to_json())
        why = report.plot(args.output + ".png")
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    return 0


def capped_context(context: int, gen: int, max_position: int) -> int:
    """Prompt tokens that leave room for ``gen`` generated ones in the model's context (as the
    pp/tg tests cap theirs), with a note on stderr when that is fewer than asked for."""
    limit = max_position - gen
    if limit < 1:
        raise ConfigError(f"--n-gen {gen} leaves no room for a prompt in the model's context of {max_position}")
    if context > limit:
        print(f"kvoffload: --context {context} capped at {limit} (the model's context {max_position} "
              f"minus {gen} tokens to generate)", file=sys.stderr)
    return min(context, limit)


def _write(output: str | None, md: str, data: str) -> None:
    print(md)
    if output:
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise ConfigError(f"--output: directory {parent} does not exist")
        for ext, text in ((".md", md + "\n"), (".json", data)):
            tmp = output + ext + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, output + ext)


def _size(text: str) -> int:
    from kvoffload.config import parse_size

    n = parse_size(text)
    if not n or n < (1 << 20):
        raise ConfigError(f"--peak-size must be at least 1MiB, got {text!r}")
    return n


def _run_kv(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from kvoffload.bench.workloads import parse_ints

    batch = parse_ints(args.batch, "--batch")[0]
    progress = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.offload_dir and not os.path.isdir(args.offload_dir):
        raise ConfigError(f"offload directory {args.offload_dir} does not exist")
    if args.kind == "disk":
        from kvoffload.bench import disk

        depths = tuple(parse_ints(args.queue_depths, "--queue-depths"))
        if args.reps < 1 or args.seconds <= 0 or min(depths) < 1:
            raise ConfigError("--reps, --seconds and --queue-depths must be positive")
        readers = tuple(r.strip() for r in args.readers.split(",") if r.strip())
        if not readers or any(r not in ("threads", "aio") for r in readers):
            raise ConfigError(f"--readers: expected threads and/or aio, got {args.readers!r}")
        cfg = disk.DiskBenchConfig(disk.parse_sizes(args.request_sizes), depths, _size(args.peak_size), args.seconds,
                                   args.reps, args.offload_dir, readers)
        cells, direct = disk.run(cfg, progress)
        _write(args.output, disk.markdown(cfg, cells, direct),
               json.dumps({"config": asdict(cfg), "direct": direct,
                           "cells": [dict(asdict(c), median=c.median) for c in cells]}, indent=1))
        return 0
    if args.kind == "attention":
        from kvoffload.bench import attention
        from kvoffload.model.loading import read_config
        from kvoffload.model.registry import resolve_model

        mc = read_config(resolve_model(args.model))
        bad = [t for t in args.tiers.split(",") if t not in ("host", "disk")]
        if bad:
            raise ConfigError(f"--tiers: unknown tier {bad[0]!r} (host, disk)")
        runs = []
        for kv_dtype in args.kv_dtype.split(","):                 # side by side, the first the baseline
            cfg = attention.AttentionBenchConfig(
                num_kv_heads=mc.num_kv_heads, group=mc.num_heads // mc.num_kv_heads, head_dim=mc.head_dim,
                layers=mc.num_layers, context=args.context or 8192, batch=batch, threads=args.threads,
                disk_workers=args.disk_workers, reps=args.reps, offload_dir=args.offload_dir,
                tiers=tuple(args.tiers.split(",")), peak_bytes=_size(args.peak_size), dtype=kv_dtype,
                kv_group_size=args.kv_group_size, block_size=args.block_size)
            runs.append((cfg, attention.run(cfg, progress)))
        _write(args.output, attention.markdown_runs(runs),
               json.dumps([{"config": asdict(cfg), "results": [dict(asdict(r), gbs=r.gbs, ratio=r.ratio) for r in res]}
                           for cfg, res in runs], indent=1))
        return 0
    from kvoffload.bench import offload
    from kvoffload.model.loading import read_config
    from kvoffload.model.registry import resolve_model

    gen = parse_ints(args.n_gen, "--n-gen")[0]
    context = capped_context(args.context or 4096, gen, read_config(resolve_model(args.model)).max_position)
    cfg = offload.OffloadBenchConfig(model=args.model, batch=batch, context=context,
                                     gen=gen, host_budget=args.kv_host_budget,
                                     threads=args.threads, disk_workers=args.disk_workers,
                                     offload_dir=args.offload_dir, peak_bytes=_size(args.peak_size),
                                     variants=not args.no_variants)
    res = offload.run(cfg, progress)
    _write(args.output, offload.markdown(res), json.dumps(res, indent=1))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from kvoffload.bench import serve
    from kvoffload.bench.workloads import parse_ints
    from kvoffload.config import EngineConfig, ServeConfig, parse_overrides

    input_len, output_len = parse_ints(args.n_prompt, "--n-prompt")[0], parse_ints(args.n_gen, "--n-gen")[0]
    if args.concurrency < 1 or args.num_prompts < 1 or not args.request_rate > 0:
        raise ConfigError("--concurrency, --num-prompts and --request-rate must be positive")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise ConfigError(f"--output: directory {os.path.dirname(os.path.abspath(args.output))} does not exist")
    with contextlib.ExitStack() as stack:
        url, vocab = args.url, 32000
        if url is None:
            try:
                from kvoffload.serve.app import create_app
                from kvoffload.serve.runner import ServerThread
            except ImportError as e:
                raise ConfigError(f"bench serve needs the serve extra ({e.name} is missing): "
                                  f"pip install 'kvoffload[serve]'") from None
            from kvoffload.api import LLM

            settings = {"max_num_seqs": max(args.concurrency, 1), "threads": args.threads, "dtype": args.dtype,
                        "quantization": args.quantization, **parse_overrides(args.engine, "--engine")}
            llm = LLM(config=EngineConfig().replace(model=args.model, **settings))
            stack.callback(llm.close)
            vocab = llm.model_config.vocab_size
            server = stack.enter_context(ServerThread(create_app(llm, ServeConfig(max_queue=args.num_prompts), "kvoffload")))
            url = server.url
        first, vocab_listed = _first_model(url, args.api_key)
        model, vocab = args.served_model or first, vocab_listed or vocab
        cfg = serve.ServeBenchConfig(url=url.rstrip("/"), model=model, input_len=input_len, output_len=output_len,
                                     num_prompts=args.num_prompts, concurrency=args.concurrency,
                                     request_rate=args.request_rate, vocab_size=vocab,
                                     text_prompts=args.text_prompts, api_key=args.api_key,
                                     ban_tokens=tuple(parse_ints(args.ban_tokens, "--ban-tokens")) if args.ban_tokens else ())
        summary = serve.run(cfg)
    _write(args.output, serve.markdown(summary, "kvoffload" if args.url is None else ""), json.dumps(summary, indent=1))
    return 0 if summary["failed"] == 0 else 1


def _first_model(url: str, api_key: str | None) -> tuple[str, int | None]:
    """The server's first model id, and its vocabulary size where the listing says it (ours does;
    token-id prompts are drawn below it, else below 32000)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        first = r.json()["data"][0]
        vocab = first.get("vocab_size")
        return first["id"], vocab if isinstance(vocab, int) and vocab > 1 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ConfigError(f"cannot list the models of {url} ({type(e).__name__}); pass --served-model") from None
