"""``kvoffload spec-bench``: self-speculative decoding against plain decoding, same placement."""

from __future__ import annotations

import argparse

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spec-bench", help="speculative decoding: acceptance and decode tok/s against plain decoding",
        description="Prefills a long document once per context length, then generates from it with plain "
                    "decoding and with self-speculation at every gamma and temperature, repetitions "
                    "interleaved, the KV placed the same way (by default a tenth in host RAM, the rest "
                    "on disk). Writes DIR/runs.jsonl (a rerun resumes), DIR/summary.{md,json} and "
                    "DIR/speedup.png.")
    p.add_argument("--lengths", "-L", default="2k,4k,8k", help="context lengths (default 2k,4k,8k; capped by the model's context)")
    p.add_argument("--gammas", default="2,4,6,8", help="draft tokens per verification (default 2,4,6,8)")
    p.add_argument("--temperatures", default="0,0.6", help="0 = greedy (default 0,0.6)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per run (default 96)")
    p.add_argument("--reps", "-r", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--host-share", default="0.1",
                   help="share of the context's KV in host RAM, the rest on disk; 'none' = all KV in RAM (default 0.1)")
    rebuild = p.add_mutually_exclusive_group()
    rebuild.add_argument("--no-rebuild-variants", action="store_true", help="skip the rebuild-rule comparison runs")
    rebuild.add_argument("--rebuild-variants-only", action="store_true",
                         help="only plain, the first gamma greedy and the rebuild rules (long generations: --new-tokens 512)")
    p.add_argument("--output", "-o", required=True, help="result directory (resumable)")
    add_dataclass_args(p, EngineConfig, include=(
        "model", "dtype", "kv_dtype", "quantization", "threads", "prefill_chunk", "cache_dir", "block_size",
        "disk_workers", "offload_dir", "spec_draft_policy", "spec_draft_budget", "spec_draft_share",
        "spec_draft_window", "sparse_chunk", "sparse_sink_tokens", "sparse_recent_tokens"))
    p.set_defaults(run=run)


def _numbers(text: str, kind: type, what: str) -> tuple:
    from kvoffload.errors import ConfigError

    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from kvoffload.bench.speculation import (
        SpecBenchConfig,
        markdown,
        summarize,
        write_report,
    )
    from kvoffload.bench.speculation import run as run_bench
    from kvoffload.errors import ConfigError
    from kvoffload.eval.config import parse_lengths

    gammas = _numbers(args.gammas, int, "--gammas")
    temps = _numbers(args.temperatures, float, "--temperatures")
    if any(not 1 <= g <= 32 for g in gammas) or any(t < 0 for t in temps):
        raise ConfigError("--gammas must be in 1..32 and --temperatures >= 0")
    if args.new_tokens < 2 or args.reps < 1:
        raise ConfigError("--new-tokens must be >= 2 and --reps >= 1")
    share = None if args.host_share.lower() == "none" else _numbers(args.host_share, float, "--host-share")[0]
    if share is not None and not 0 <= share <= 1:
        raise ConfigError(f"--host-share must be in [0, 1] or none, got {args.host_share}")
    engine_cfg = dataclass_from_args(EngineConfig, args)         # validates every flag
    engine = {f: getattr(args, f) for f in vars(args) if f in EngineConfig.field_names() and f != "model"}
    cfg = SpecBenchConfig(lengths=parse_lengths(args.lengths), gammas=gammas, temperatures=temps,
                          new_tokens=args.new_tokens, reps=args.reps, host_share=share)
    if args.no_rebuild_variants:
        cfg = dataclasses.replace(cfg, rebuilds=())
    if args.rebuild_variants_only:
        cfg = dataclasses.replace(cfg, grid=False, rebuild_gamma=gammas[0])
    os.makedirs(args.output, exist_ok=True)
    records = run_bench(engine_cfg.model, cfg, engine, args.output)
    with open(os.path.join(args.output, "runs.jsonl")) as f:
        everything = [json.loads(line) for line in f if line.strip()]
    print(markdown(summarize(records)), end="")
    why = write_report(everything, args.output)
    if why:
        print(f"(no plot: {why})")
    return 0
