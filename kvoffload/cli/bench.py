"""``kvoffload bench``: prefill/decode speed beside llama.cpp and HF transformers (llama-bench style)."""

from __future__ import annotations

import argparse
import os
import sys

from kvoffload.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill (ppN) and decode (tgN @ dD) throughput, optionally vs peers",
                       description="Each test is repeated --reps times after a warm-up, engines interleaved; "
                                   "reports medians (min-max), pairwise ratios and RSS.")
    p.add_argument("-m", "--model", default=None, help="GGUF file or alias (default: embedded SmolLM2)")
    p.add_argument("-p", "--n-prompt", default="512", help="prefill tests: prompt lengths (comma-separated)")
    p.add_argument("-n", "--n-gen", default="32", help="decode tests: tokens generated (comma-separated)")
    p.add_argument("-d", "--depth", default="0", help="decode tests: context already in the cache")
    p.add_argument("-b", "--batch", default="1", help="sequences run together (comma-separated)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions after the warm-up")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--vs", default="", help="peers to run side by side: llama.cpp, transformers (comma-separated)")
    p.add_argument("--dtype", default="auto", help="kvoffload compute dtype")
    p.add_argument("-q", "--quantization", default="auto", help="kvoffload decode weight format")
    p.add_argument("--hf-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("-o", "--output", default=None,
                   help="write PREFIX.md, PREFIX.json and PREFIX.png (default: print the table only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvoffload.bench.spec import make_tests, parse_ints

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
    if args.output:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise ConfigError(f"--output: directory {parent} does not exist")
    report = run_bench(BenchConfig(args.model, tuple(tests), args.reps, args.threads, vs, args.dtype,
                                   args.quantization, args.hf_dtype))
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
