"""``kvoffload eval``: long-context tasks, perplexity and agreement with dense, at several lengths."""

from __future__ import annotations

import argparse
import sys

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    from kvoffload.eval.tasks import TASKS

    p = sub.add_parser(
        "eval", help="long-context accuracy (passkey, RULER-style tasks), perplexity, agreement with dense",
        description="Runs TASK at each length for one engine configuration (the engine flags below), "
                    "prints a markdown table and, with -o DIR, appends each sample to DIR/samples.jsonl "
                    "(a killed run resumes there) and writes DIR/results.{md,json,png} for every "
                    "configuration run into DIR. Tasks: " + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    p.add_argument("task", help="task name, comma-separated names, or 'all'")
    p.add_argument("--lengths", "-L", default="1k,2k,4k,8k",
                   help="target lengths in model tokens, prompt + tokens to generate (k = 1024; default: 1k,2k,4k,8k)")
    add_dataclass_args(p, _eval_config_cls(), exclude=("tasks", "lengths"))
    add_dataclass_args(p, EngineConfig)
    p.set_defaults(run=run)


def _eval_config_cls():
    from kvoffload.eval.config import EvalConfig

    return EvalConfig


def run(args: argparse.Namespace) -> int:
    from kvoffload.eval.config import parse_lengths, parse_tasks
    from kvoffload.eval.runner import run as run_eval
    from kvoffload.eval.runner import write_outputs

    cfg = dataclass_from_args(_eval_config_cls(), args, tasks=parse_tasks(args.task), lengths=parse_lengths(args.lengths))
    engine_cfg = dataclass_from_args(EngineConfig, args)
    report = run_eval(cfg, engine_cfg)
    print(report.markdown(), end="")
    if cfg.output:
        why = write_outputs(report, cfg.output)
        if why:
            print(f"no plot: {why}", file=sys.stderr)
    return 0
