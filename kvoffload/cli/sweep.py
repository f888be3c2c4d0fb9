"""``kvoffload sweep``: every sparse policy at every budget against dense (prefill shared)."""

from __future__ import annotations

import argparse
import sys

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="accuracy and bytes read of sparse policies x budgets against dense attention",
        description="Prefills each sample once (dense) and decodes it with every policy at every budget "
                    "and with dense attention: task scores, next-token agreement, KL and perplexity delta "
                    "against dense, fraction of the KV read and read amplification. With -o DIR, results "
                    "are appended to DIR/sweep.jsonl (a rerun resumes) and DIR/sweep.{md,json,png} written.")
    p.add_argument("tasks", help="comma-separated tasks (generation tasks and/or agreement)")
    p.add_argument("--policies", default="streaming,quest,sparf,double_sparsity,shadowkv", help="policies (default: all)")
    p.add_argument("--budgets", default="1/4,1/8,1/16,1/32", help="budgets (default: 1/4,1/8,1/16,1/32)")
    p.add_argument("--lengths", "-L", default="2k,4k,8k", help="lengths (default: 2k,4k,8k)")
    p.add_argument("--samples", type=int, default=3, help="samples per task and length (default 3)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the samples (default 0)")
    p.add_argument("--decode-tokens", type=int, default=64, help="agreement: tokens decoded one by one (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on a generation task's output tokens (default: the task's own)")
    p.add_argument("--no-chat", action="store_true", help="plain-text prompts instead of the chat template")
    p.add_argument("--output", "-o", default=None, help="result directory (resumable)")
    add_dataclass_args(p, EngineConfig, include=("model", "dtype", "kv_dtype", "threads", "prefill_chunk",
                                                  "cache_dir", "block_size", "sparse_calibration", "sparse_rank"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from kvoffload.errors import ConfigError, InputError
    from kvoffload.eval.config import parse_lengths
    from kvoffload.eval.sweep import SweepConfig, markdown, summarize, write_report
    from kvoffload.eval.sweep import run as run_sweep
    from kvoffload.eval.tasks import get_task

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    for t in tasks:
        if get_task(t).kind == "ppl":
            raise InputError("ppl is prefill-only (the same for every policy); agreement reports the perplexity delta")
    if args.samples < 1 or args.decode_tokens < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ConfigError("--samples, --decode-tokens and --max-new-tokens must be >= 1")
    if args.output and not os.path.isdir(args.output):
        os.makedirs(args.output, exist_ok=True)
    engine_cfg = dataclass_from_args(EngineConfig, args)
    cfg = SweepConfig(policies=tuple(p for p in args.policies.split(",") if p),
                      budgets=tuple(b for b in args.budgets.split(",") if b), tasks=tasks,
                      lengths=parse_lengths(args.lengths), samples=args.samples, seed=args.seed,
                      decode_tokens=args.decode_tokens, calibration=engine_cfg.sparse.sparse_calibration,
                      output=args.output, chat=not args.no_chat, max_new_tokens=args.max_new_tokens)
    records = run_sweep(cfg, engine_cfg)
    print(markdown(summarize(records)), end="")
    if args.output:
        why = write_report(records, args.output)
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    return 0
